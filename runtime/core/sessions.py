"""onnxruntime sessions for model folders, and the thread-pool policy they share.

Thread pools: chained sessions that each own an intra-op pool are slow on
small CPUs because idle pool threads spin and steal the cores from the session
that runs. So, by default, all sessions of the process share onnxruntime's
global thread pool when this onnxruntime has ``set_global_thread_pool_sizes``;
otherwise (or with ``shared_pool=False``) each session gets its own pool with
spinning turned off. Once the global pool exists, onnxruntime refuses any
session that does not use it: create other sessions in the same process with
``make_session`` (or ``session_options``), not with a bare
``onnxruntime.InferenceSession``.
"""

from __future__ import annotations

import os
import threading
from typing import Any, List, Optional, Sequence, Union

import numpy as np

from ..common.errors import ErdeError, ModelFolderError

try:
    import onnxruntime as ort
except ImportError:  # reported when a session is made, so that importing the runtime alone never fails
    ort = None  # type: ignore[assignment]

#: Default for ``shared_pool``: use onnxruntime's process-wide thread pool when available.
SHARED_POOL_DEFAULT = True
DEFAULT_PROVIDERS = ("CPUExecutionProvider",)


_pool_lock = threading.Lock()
_global_pool_threads: Optional[int] = None  # threads of the global pool we created; 0 = onnxruntime's default
_global_pool_active = False


def _one_line(e: BaseException, limit: int = 300) -> str:
    """onnxruntime's messages span lines; an Error: line must not."""
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[:limit] + "..."




def _require_ort() -> Any:
    if ort is None:
        raise ErdeError("onnxruntime is not installed; install the runtime with: pip install 'erde[runtime]'")
    return ort


def _check_threads(threads: Optional[int]) -> Optional[int]:
    if threads is None:
        return None
    if isinstance(threads, bool) or not isinstance(threads, (int, np.integer)) or threads < 1:
        raise ErdeError(f"threads must be a positive integer or None (onnxruntime's default), got {threads!r}")
    return int(threads)


def _use_global_pool(threads: Optional[int], shared_pool: bool) -> bool:
    """Create the global pool if wanted and possible; return whether sessions must use it."""
    global _global_pool_threads, _global_pool_active
    rt = _require_ort()
    with _pool_lock:
        if _global_pool_active:
            if threads is not None and threads != _global_pool_threads:
                have = "onnxruntime's default number of" if not _global_pool_threads else str(_global_pool_threads)
                raise ErdeError(
                    f"this process already runs models on a shared onnxruntime thread pool of {have} threads, "
                    f"which cannot be resized; pass threads={_global_pool_threads or None} (or omit threads), "
                    "or use a separate process for another thread count")
            return True
        if not shared_pool or not hasattr(rt, "set_global_thread_pool_sizes"):
            return False
        try:
            rt.set_global_thread_pool_sizes(threads or 0, 1)
        except Exception as e:  # someone else in this process created the global pools first: use them
            if "already" not in str(e):
                raise ErdeError(f"onnxruntime could not create its shared thread pool: {e}") from None
            _global_pool_threads = threads
        else:
            _global_pool_threads = threads or 0
        _global_pool_active = True
        return True


def session_options(threads: Optional[int] = None, shared_pool: Optional[bool] = None) -> Any:
    """SessionOptions for one session: all graph optimisations, and the thread-pool policy above.

    ``threads`` None means onnxruntime's default (one thread per physical core).
    ``shared_pool`` None means ``SHARED_POOL_DEFAULT``.
    """
    rt = _require_ort()
    threads = _check_threads(threads)
    so = rt.SessionOptions()
    so.graph_optimization_level = rt.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = rt.ExecutionMode.ORT_SEQUENTIAL
    if _use_global_pool(threads, SHARED_POOL_DEFAULT if shared_pool is None else shared_pool):
        so.use_per_session_threads = False
    else:
        so.intra_op_num_threads = threads or 0
        so.inter_op_num_threads = 1
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return so


def _check_providers(providers: Optional[Sequence[str]]) -> List[str]:
    if providers is None:
        return list(DEFAULT_PROVIDERS)
    if isinstance(providers, str) or not providers:
        raise ErdeError(f"providers must be a non-empty list of names, got {providers!r}")
    available = _require_ort().get_available_providers()
    unknown = [p for p in providers if p not in available]
    if unknown:
        raise ErdeError(f"onnxruntime provider(s) {unknown} are not available here; available: {available}")
    return list(providers)


def make_session(model: Union[str, os.PathLike, bytes], threads: Optional[int] = None,
                 providers: Optional[Sequence[str]] = None, shared_pool: Optional[bool] = None,
                 name: str = "") -> Any:
    """An onnxruntime.InferenceSession that follows this module's thread-pool policy."""
    rt = _require_ort()
    so = session_options(threads, shared_pool)
    where = name or (str(model) if not isinstance(model, bytes) else "ONNX model")
    try:
        return rt.InferenceSession(model if isinstance(model, bytes) else str(model), so,
                                   providers=_check_providers(providers))
    except ErdeError:
        raise
    except Exception as e:
        raise ModelFolderError(f"{where}: onnxruntime cannot load this graph ({_one_line(e)}); "
                               "re-export the model folder with erde-export") from None


