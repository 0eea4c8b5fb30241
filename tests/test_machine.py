"""runtime/common/machine.py: the facts records carry."""

import socket

from erde.runtime.common import machine
def test_facts_name_the_cpu_and_never_the_host():
    assert machine.cpu_model() and machine.usable_cores() >= 1
    assert machine.effective_threads(None) == machine.usable_cores() and machine.effective_threads(3) == 3
    line = machine.describe()
    assert machine.cpu_model() in line and socket.gethostname() not in line
