"""Connect to a Ray cluster, or start a local instance sized so Ray Data keeps CPU.

On a 2-core machine, two training workers at 1 CPU each on a 2-CPU Ray instance leave Ray
Data's read tasks nothing to run on and the job hangs ("Cluster resources are not enough to
run any task"). Logical CPUs are a scheduling budget, not cores, so the local instance
advertises more of them than the workers reserve.
"""
from __future__ import annotations

import logging
import os
import socket
import warnings

from wss_ray.config import RayConfig

# set by --verbose: Ray's own logs (workers, Train controller, Data executor) on the console
VERBOSE_ENV = "WSS_RAY_VERBOSE"


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV) == "1"


def is_local() -> bool:
    """True when this process started the Ray instance it uses (progress comes through a file)."""
    return _LOCAL["started"]


_LOCAL = {"started": False}


def stop_local() -> None:
    """Shut down the local instance this process started (a cluster is left alone)."""
    import ray

    if is_local() and ray.is_initialized():
        ray.shutdown()
    _LOCAL["started"] = False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _start_local(cfg: RayConfig, attempts: int = 3) -> None:
    """Start a local instance whose workers know its address.

    When a Tune trial ends or is stopped early, Ray Train's placement-group cleaner (a detached
    actor) asks the state API whether the trial's controller is gone and then frees the workers'
    CPUs. It finds the cluster from RAY_ADDRESS, else by scanning the machine; with a second Ray
    instance on the machine that scan fails, the cleaner's thread dies, the CPUs stay reserved and
    the next trial waits for them forever. So the GCS port is chosen here and handed to every
    worker of this job. The dashboard (on loopback) serves that state API.
    """
    import ray

    # Ray Data's Parquet reader lists a dataset's files through a pool of footer-reading actors,
    # 32 by default, each a process of its own: made for object stores far away, on a 2-core
    # machine the processes' start-up cost more than the read (validation split: 9.8 s -> 2.6 s
    # with one, same rows in the same order; BENCHMARKS.md). Set before ray.init, so that the
    # local instance's processes inherit it; a user's own setting wins.
    os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "1")
    # Ray Train's watcher of cloud spot-instance preemption: one more process per run, and
    # this machine is not preempted
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    # how often Ray Train's controller polls its workers (2 s by default): a run's end is seen
    # only at the next poll, and a report waits for one; at 0.5 s a run ends ~5 s sooner (a
    # 4-step run: last step to result 6.0 s -> 1.0 s), and on one machine a poll costs little
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    for attempt in range(attempts):
        port = _free_port()
        saved = os.environ.get("RAY_GCS_SERVER_PORT")
        os.environ["RAY_GCS_SERVER_PORT"] = str(port)
        try:
            # quiet by default: workers' and Ray's own output go to Ray's log files (path printed);
            # the project's progress reaches the console through the runner's progress file
            ray.init(num_cpus=cfg.local_cpus(), include_dashboard=True, dashboard_host="127.0.0.1",
                     log_to_driver=verbose(), logging_level=logging.INFO if verbose() else logging.ERROR,
                     runtime_env={"env_vars": {"RAY_ADDRESS": f"127.0.0.1:{port}"}})
            _LOCAL["started"] = True
            if not verbose():
                # Ray's start-up warning, said once in the project's words: the local instance
                # only listens on this machine and asks for a token (Ray's default since 2.5x)
                print(f"[ray] local instance with {cfg.local_cpus()} logical CPUs, listening on this machine "
                      f"only; Ray's own logs: {_logs_dir()} (--verbose shows them here)")
            return
        except Exception:
            # the port was taken between the probe and the GCS binding it
            if attempt == attempts - 1:
                raise
            ray.shutdown()
        finally:
            if saved is None:
                os.environ.pop("RAY_GCS_SERVER_PORT", None)
            else:
                os.environ["RAY_GCS_SERVER_PORT"] = saved


def ensure_ray(cfg: RayConfig | None = None) -> None:
    import ray

    cfg = cfg or RayConfig()
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    if not verbose():
        # Ray's notices about its own set-up (token auth on, progress bars off, each dataset's
        # "execution finished") are not the user's business on the console; Ray Data configures
        # its loggers itself and reads its level from this variable
        logging.getLogger("ray").setLevel(logging.ERROR)
        _quiet_ray_data_console()
    address = cfg.address or os.environ.get("RAY_ADDRESS", "")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        _start_local(cfg)
        if not verbose():
            _quiet_raylet_notices()
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    if not verbose():
        # deprecation notices about Ray's own internals: nothing a user of this project can act on
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"ray(\.|$)")


def _quiet_ray_data_console() -> None:
    """Ray Data's notices ("Progress bars disabled", each dataset's "execution finished") off the
    console but still in its log file (ray-data.log): Ray Data re-reads its logging config for
    every dataset, from the file named by RAY_DATA_LOGGING_CONFIG (its documented hook), so a
    copy of its default config with the console handler at ERROR is written and named there."""
    if "RAY_DATA_LOGGING_CONFIG" in os.environ:
        return  # the user's own choice
    try:
        import copy
        import tempfile

        import yaml
        from ray.data._internal.logging import DEFAULT_CONFIG
    except ImportError:
        return
    config = copy.deepcopy(DEFAULT_CONFIG)
    console = config.get("handlers", {}).get("console")
    if console is None:
        return
    console["level"] = "ERROR"
    fd, path = tempfile.mkstemp(prefix="wss-ray-data-logging-", suffix=".yaml")
    with os.fdopen(fd, "w") as fh:
        yaml.safe_dump(config, fh)
    os.environ["RAY_DATA_LOGGING_CONFIG"] = path
    # this process configured Ray Data's loggers when it imported ray.data; do it again now
    # (worker processes inherit the variable and read it when they start)
    try:
        from ray.data._internal.logging import configure_logging

        configure_logging()
    except Exception:  # a private function: if Ray moves it, its notices just show
        pass


def _quiet_raylet_notices() -> None:
    """The raylet's notice "N PYTHON worker processes have been started ..." (Ray Data's read
    tasks on a small machine) reaches the driver's console whatever ``log_to_driver`` says; it is
    left in Ray's log files instead. A private hook: if Ray moves it, the notice just shows."""
    try:
        import ray._private.worker as w
    except ImportError:
        return
    original = getattr(w, "print_to_stdstream", None)
    if original is None or getattr(original, "_wss_quiet", False):
        return

    def printer(data, *args, **kwargs):
        # only this notice: others from the raylet (a worker killed for memory) matter
        if data.get("pid") == "raylet" and any("worker processes have been started" in str(line)
                                               for line in data.get("lines", ())):
            return None
        return original(data, *args, **kwargs)

    printer._wss_quiet = True
    w.print_to_stdstream = printer


def _logs_dir() -> str:
    try:
        import ray._private.worker as w

        return w._global_node.get_logs_dir_path()
    except Exception:  # a private API: fall back to the documented default
        return "/tmp/ray/session_latest/logs"
