"""Start processes as the ranks of an ``mx.distributed`` ring on this machine, for the sharded
benchmark and the tests: each rank gets ``MLX_RANK`` and a host file of free localhost ports,
one BLAS thread (ranks share the cores), and every rank's exit status comes back (``mlx.launch``
exits 0 whatever its ranks do)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path

ONE_THREAD = {k: "1" for k in ("MKL_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "VECLIB_MAXIMUM_THREADS")}


def free_ports(n: int) -> list[int]:
    """``n`` distinct free localhost ports (all held until all are chosen, so none repeats)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def run_ring(commands: list[list[str]], folder: Path, timeout: float, env: dict[str, str] | None = None) -> list[tuple[int, str]]:
    """Run ``commands[r]`` as rank r of a localhost ring (its host file written to ``folder``),
    in ``env`` (default: this process's) with one BLAS thread; wait for all and return each
    rank's (exit status, output, stderr included). Past ``timeout`` seconds every rank is
    killed and a TimeoutError carries the end of each rank's output (a hang)."""
    hostfile = Path(folder) / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{port}"] for port in free_ports(len(commands))]))
    base = {**(os.environ if env is None else env), **ONE_THREAD, "MLX_HOSTFILE": str(hostfile)}
    procs = [subprocess.Popen(command, env={**base, "MLX_RANK": str(rank)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for rank, command in enumerate(commands)]
    deadline = time.monotonic() + timeout
    results = []
    try:
        for proc in procs:
            output, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            results.append((proc.returncode, output))
    except subprocess.TimeoutExpired:
        outputs = []
        for proc in procs:
            proc.kill()
            outputs.append(proc.communicate()[0][-3000:])
        raise TimeoutError(f"the ranks did not finish within {timeout:.0f} s (a hang):\n" + "\n---\n".join(outputs)) from None
    return results
