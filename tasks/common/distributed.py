"""DeepSpeed launch and process setup for the training stages (pretrain, sft, reward, dpo).

A training stage runs in two halves:

    python -m tasks.<stage>            launcher side: `training.launch` loads and checks the params (batch arithmetic,
                                       inputs, model shape) once, then execs the DeepSpeed launcher:
        deepspeed --num_gpus N --master_port P --no_local_rank --module tasks.<stage> --worker
        deepspeed --hostfile H ...     (several nodes: one line `host slots=N` per node)
    python -m tasks.<stage> --worker   worker side, once per rank (RANK, LOCAL_RANK, WORLD_SIZE set by the
                                       launcher): `stage_main(...)` → run() → `init_distributed()` → Trainer.

    world = init_distributed()                # World(rank, local_rank, size, local_size, device, backend)
    precision = resolve_precision(train.precision, world)     # fp32 | bf16 | autocast
    config = deepspeed_config(train, world, precision)         # the DeepSpeed JSON
    peak = peak_flops(world, precision != "fp32", override=train.peak_flops)  # FLOP/s for MFU

Rendezvous. On one host (MASTER_ADDR a loopback address: the launcher's choice without a hostfile) rank 0 serves
torch's TCPStore from a socket bound to that address and gloo binds the loopback interface, so nothing of a
training job listens beyond this machine (torch's TCPStore otherwise binds every interface, whatever MASTER_ADDR
says). With a hostfile naming other hosts, MASTER_ADDR is the first host's address and torch's default applies.

Device: `resolve_device` at launch: $SCRATCHLM_DEVICE, else `train.device`, else $DS_ACCELERATOR, else cuda when
torch sees a device; the launcher hands its choice to the ranks as DS_ACCELERATOR.
CPU: gloo, the host's cores
split between its ranks (one OpenMP thread per rank on a 2-core host: two threads in one process collapse as soon
as another job takes a core, 1,300 vs 4,300 tokens/s for the small preset at load ~4). GPU: NCCL. Either way the
optimizer is torch.optim.AdamW, built by the trainer, and no DeepSpeed C++ op is JIT-built; except with
`train.offload`, where the trainer takes DeepSpeedCPUAdam, JIT-built once per environment (~3 CPU-minutes here).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import math
import os
import platform
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.common.config import ROOT, ConfigError, ScratchError
from tasks.common.train_config import TrainConfig

if TYPE_CHECKING:
    import torch

WORKER_FLAG = "--worker"

# Dense bf16 tensor-core peaks (FLOP/s) by device-name fragment, most specific first. fp32 runs are measured
# against the same peak (the usual MFU convention); give `peak_flops` in the params for anything else.
GPU_PEAK_BF16: list[tuple[str, float]] = [
    ("H200", 989e12),
    ("H100", 989e12),
    ("H800", 989e12),
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("A10G", 70e12),
    ("A10", 125e12),
    ("RTX 4090", 165e12),
    ("RTX 3090", 71e12),
    ("V100", 125e12),
    ("T4", 65e12),
]


# ------------------------------------------------------------------------------------------------ launcher side


DEVICE_ENV = "SCRATCHLM_DEVICE"


def resolve_device(setting: str = "auto") -> str:
    """Where the ranks train, "cuda" or "cpu": $SCRATCHLM_DEVICE, else `setting` (train.device) unless auto, else
    $DS_ACCELERATOR when it names one of the two (the tests, CI, a GPU image), else cuda when torch sees a device."""
    override = os.environ.get(DEVICE_ENV, "")
    where, chosen = (DEVICE_ENV, override) if override else ("train.device", setting)
    if chosen not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"{where}: must be auto, cpu or cuda, got {chosen!r}")
    if chosen == "auto" and os.environ.get("DS_ACCELERATOR") in ("cpu", "cuda"):
        return os.environ["DS_ACCELERATOR"]
    import torch

    if chosen == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if chosen == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"{where}: cuda, but this torch ({torch.__version__}) sees no CUDA device; on a host with an NVIDIA "
            f"driver install the CUDA build (`make install`, or TORCH_VARIANT=cu128), or set it to auto or cpu"
        )
    return chosen


def cpu_only(setting: str = "auto") -> bool:
    """True when training runs on CPU ranks (resolve_device: no CUDA device, or cpu asked for)."""
    return resolve_device(setting) == "cpu"


def hostfile_slots(path: Path) -> dict[str, int]:
    """host → slots of a DeepSpeed hostfile (`host slots=N` per line, # comments), with errors naming the line."""
    if not path.is_file():
        raise ScratchError(f"{path}: hostfile not found")
    hosts: dict[str, int] = {}
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[1].startswith("slots=") or not parts[1][6:].isdigit() or int(parts[1][6:]) < 1:
            raise ScratchError(f"{path}:{number}: expected `<host> slots=<N>` with N >= 1, got {raw.strip()!r}")
        if parts[0] in hosts:
            raise ScratchError(f"{path}:{number}: host {parts[0]!r} is listed twice")
        hosts[parts[0]] = int(parts[1][6:])
    if not hosts:
        raise ScratchError(f"{path}: no `<host> slots=<N>` lines")
    return hosts


def planned_world_size(train: TrainConfig, root: Path = ROOT) -> int:
    """Ranks the launcher will start: `ranks` on this host, or every slot of the hostfile."""
    if train.hostfile:
        return sum(hostfile_slots(root / train.hostfile).values())
    return train.ranks


LOOPBACK = "127.0.0.1"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def launch_command(module: str, train: TrainConfig, root: Path = ROOT) -> tuple[list[str], dict[str, str]]:
    """The `deepspeed` command line and environment that start `module --worker` on every rank."""
    cmd = [sys.executable, "-u", "-m", "deepspeed.launcher.runner", "--log_level", "warning"]
    if train.hostfile:
        cmd += ["--hostfile", str(root / train.hostfile)]
    else:
        cmd += ["--num_gpus", str(train.ranks), "--master_addr", LOOPBACK]  # one host: the rendezvous stays local
    cmd += ["--master_port", str(free_port()), "--no_local_rank", "--module", module, WORKER_FLAG]
    env = dict(os.environ)
    env.setdefault("TORCH_EXTENSIONS_DIR", torch_extensions_dir())
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    env["DS_ACCELERATOR"] = resolve_device(train.device)  # the ranks' accelerator, also on the other hosts
    if env["DS_ACCELERATOR"] == "cpu":
        # ranks of one host share its cores; torch would otherwise start one thread per core in every rank
        local = train.ranks if not train.hostfile else 1
        env.setdefault("OMP_NUM_THREADS", str(max(1, usable_cores() // local)))
    if train.hostfile:
        env["DS_ENV_FILE"] = str(write_remote_env(env, root / "checkpoints" / f".{module}.deepspeed_env"))
    return cmd, env


REMOTE_ENV = (
    "SCRATCHLM_",
    "DS_ACCELERATOR",
    "TORCH_EXTENSIONS_DIR",
    "HF_",
    "TOKENIZERS_PARALLELISM",
    "OMP_NUM_THREADS",
)


def write_remote_env(env: dict[str, str], path: Path) -> Path:
    """The variables other nodes need (params file, parent MLflow run, offline flags) in DeepSpeed's env-file format:
    over pdsh the runner forwards only MLFLOW*/PYTHON* and what this file lists."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"{k}={v}" for k, v in sorted(env.items()) if k.startswith(REMOTE_ENV) and "\n" not in v]
    path.write_text("\n".join(lines) + "\n")
    return path


def torch_extensions_dir() -> str:
    """A JIT-build folder of this environment's own: two venvs sharing ~/.cache/torch_extensions rebuild
    DeepSpeed's ops for each other on every start."""
    import hashlib

    venv = hashlib.sha256(sys.prefix.encode()).hexdigest()[:10]
    return str(Path.home() / ".cache" / "scratchlm" / "torch_extensions" / venv)


# ------------------------------------------------------------------------------------------------ worker side


@dataclass(frozen=True)
class World:
    """This process's place among the DeepSpeed ranks."""

    rank: int
    local_rank: int
    size: int
    local_size: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def on_cpu(self) -> bool:
        return self.device.type == "cpu"

    @property
    def hosts(self) -> int:
        return max(1, self.size // max(1, self.local_size))


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def init_distributed() -> World:
    """Join the process group (idempotent). Without launcher variables, a world of one (tests, notebooks)."""
    import deepspeed
    import torch
    import torch.distributed as dist

    os.environ.setdefault(
        "DS_ACCELERATOR", resolve_device()
    )  # the launcher sets it; else $SCRATCHLM_DEVICE or detection
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", torch_extensions_dir())
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    deepspeed.utils.logger.setLevel(logging.WARNING)
    if "RANK" not in os.environ:  # started without a launcher: be rank 0 of 1
        os.environ.update(
            {
                "RANK": "0",
                "LOCAL_RANK": "0",
                "WORLD_SIZE": "1",
                "LOCAL_WORLD_SIZE": "1",
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(free_port()),
            }
        )
    on_cpu = os.environ["DS_ACCELERATOR"] == "cpu"
    backend = "gloo" if on_cpu else "nccl"
    if on_cpu:
        _skip_shared_memory_op()
    if not dist.is_initialized():
        if os.environ.get("WORLD_SIZE") == "1":
            # a world of one needs no rendezvous: an in-memory store cannot lose a race for a TCP port
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        elif (address := loopback_master()) is not None:
            if on_cpu:
                _bind_gloo_to_loopback()
            from deepspeed.constants import default_pg_timeout  # what deepspeed.init_distributed would use

            rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
            store = loopback_store(address, int(os.environ["MASTER_PORT"]), rank, size, default_pg_timeout)
            dist.init_process_group(backend, store=store, rank=rank, world_size=size, timeout=default_pg_timeout)
        deepspeed.init_distributed(dist_backend=backend)  # adopts a process group that is already there
    rank, size = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_size = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", size)))
    if on_cpu:
        device = torch.device("cpu")
        # ranks of one host share its cores; an oversubscribed OpenMP pool spins and runs many times slower
        threads = os.environ.get("OMP_NUM_THREADS", "")
        torch.set_num_threads(int(threads) if threads.isdigit() else max(1, usable_cores() // local_size))
    else:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    return World(rank, local_rank, size, local_size, device, backend)


def loopback_master() -> str | None:
    """MASTER_ADDR as an IP address when it is a loopback one (127.0.0.0/8, ::1, localhost); else None."""
    host = os.environ.get("MASTER_ADDR", "")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        if host != "localhost":
            return None  # a host name: another machine, or this one by a name others can reach
        address = ipaddress.ip_address(LOOPBACK)
    return str(address) if address.is_loopback else None


def loopback_store(address: str, port: int, rank: int, size: int, timeout: Any) -> Any:
    """torch's TCPStore for a one-host rendezvous. Rank 0 serves it from a socket it binds to `address` itself:
    given only a host and port, the store's server binds every interface (*:port), reachable from the network."""
    import torch.distributed as dist

    if rank != 0:
        return dist.TCPStore(address, port, size, is_master=False, timeout=timeout)
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as torch's own server does
        listener.bind((address, port))
        listener.listen(max(128, size))
    except OSError as e:
        listener.close()
        raise ScratchError(
            f"rendezvous: cannot listen on {address}:{port} ({e.strerror}); another program took "
            f"the port the launcher picked, run the stage again"
        ) from None
    # the store owns the descriptor from here on (and closes it with the server)
    return dist.TCPStore(
        address, port, size, is_master=True, timeout=timeout, multi_tenant=True, master_listen_fd=listener.detach()
    )


def _bind_gloo_to_loopback() -> None:
    """Make gloo's own rank-to-rank sockets listen on the loopback interface (GLOO_SOCKET_IFNAME; gloo otherwise
    binds the address this host's name resolves to). Left alone when set, or when no loopback interface is found."""
    if os.environ.get("GLOO_SOCKET_IFNAME"):
        return
    name = loopback_interface()
    if name:
        os.environ["GLOO_SOCKET_IFNAME"] = name


def loopback_interface() -> str | None:
    """The name of this host's loopback network interface (`lo` on Linux, `lo0` on macOS), or None."""
    try:
        names = [name for _, name in socket.if_nameindex()]
    except OSError:
        return None
    for name in names:
        try:  # Linux: IFF_LOOPBACK (0x8) in the interface flags
            if int(Path(f"/sys/class/net/{name}/flags").read_text(), 16) & 0x8:
                return name
        except (OSError, ValueError):
            continue
    return next((n for n in ("lo", "lo0") if n in names), None)


def _skip_shared_memory_op() -> None:
    """Skip DeepSpeed's CPU shared-memory all-reduce op: it serves only `inference_all_reduce` (tensor-parallel
    inference; training reduces through the gloo process group), and building it probes every op builder and
    JIT-compiles C++ (~45 s on a fresh machine, minutes under load)."""
    import importlib

    ds_comm = importlib.import_module("deepspeed.comm.torch")  # not `import ... as`: deepspeed.comm.torch is torch
    if hasattr(ds_comm, "build_shm_op"):
        ds_comm.build_shm_op = lambda: None


def resolve_precision(precision: str, world: World) -> str:
    """The arithmetic a run uses: `fp32`; `bf16` (DeepSpeed bf16: bf16 weights, activations and gradients, fp32
    master weights in the optimizer); or `autocast` (fp32 weights, bf16 matmuls under torch.autocast).
    `auto` = bf16 on a GPU that supports it; on CPU, autocast when the cores have native bf16 (AVX512-BF16 or
    AMX; ~2-4x faster than fp32 there), else fp32."""
    import torch

    if precision == "auto":
        if world.on_cpu:
            return "autocast" if cpu_has_native_bf16() else "fp32"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if precision != "fp32" and not world.on_cpu and not torch.cuda.is_bf16_supported():
        raise ScratchError(
            f"train.precision: {precision} needs bf16, which {torch.cuda.get_device_name()} lacks; use fp32 or auto"
        )
    return precision


def cpu_has_native_bf16() -> bool:
    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        return False
    return bool({"avx512_bf16", "amx_bf16"} & set(flags.split()))


ZERO3_WINDOW = 20_000_000  # elements: 80 MB of fp32 per bucket; a `1b` block is 60M parameters, a `125m` one 7M
ZERO3_WINDOW_KEYS = (
    "reduce_bucket_size",
    "stage3_prefetch_bucket_size",
    "stage3_max_live_parameters",
    "stage3_max_reuse_distance",
)


def deepspeed_config(train: TrainConfig, world: World, precision: str) -> dict[str, Any]:
    """The DeepSpeed config of a training run: batch split, ZeRO stage, precision, clipping.

    It names no optimizer: the trainer builds torch.optim.AdamW itself (trainer.build_optimizer) and hands it to
    deepspeed.initialize, which wraps it (ZeRO partitions its states, bf16 keeps fp32 master weights in it).
    """
    accumulation = train.grad_accum(world.size)
    zero: dict[str, Any] = {"stage": train.zero_stage}
    if train.zero_stage == 3:
        # gather whole layers for small models instead of many tiny prefetches
        zero.update({"stage3_param_persistence_threshold": 0, "stage3_gather_16bit_weights_on_model_save": False})
        # and hold only a few of them at a time: DeepSpeed's defaults (5e8-element gradient buckets, 1e9 parameters
        # kept live and reused) keep every layer of a 1B model gathered and a 2 GB fp32 bucket on each rank, which
        # made a 125m ZeRO-3 rank peak above an unsharded one (docs/BENCHMARKS.md, "Memory")
        zero.update({key: ZERO3_WINDOW for key in ZERO3_WINDOW_KEYS})
        zero["sub_group_size"] = 5 * ZERO3_WINDOW  # the optimizer steps its partition in pieces of this many elements
    if train.offload != "none":  # ZeRO-Offload: the optimizer's fp32 partitions (and its step) in host memory
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": not world.on_cpu}
    if train.offload == "all":  # and the parameters' partitions, fetched to the device layer by layer
        zero["offload_param"] = {"device": "cpu", "pin_memory": not world.on_cpu}
    config = {
        "train_batch_size": train.batch_size,
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": train.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": False},
        "steps_per_print": 10**9,  # the trainer logs; DeepSpeed's own progress lines would interleave
        "wall_clock_breakdown": False,
        "dump_state": False,
    }
    if precision == "autocast":
        config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    if train.offload != "none":
        # the trainer's optimizer: DeepSpeedCPUAdam where its C++ op builds, else torch AdamW (trainer.build_optimizer)
        config["zero_force_ds_cpu_optimizer"] = False
    return config


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over every rank in place (a no-op for a world of one) and return it."""
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s `obj` (picklable) on every rank; `obj` itself in a world of one."""
    import torch.distributed as dist

    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


# ------------------------------------------------------------------------------------------------ peak FLOP/s


def peak_flops(world: World, bf16: bool, override: float = 0.0) -> float:
    """Peak FLOP/s of the whole job, the denominator of MFU.

    `override` (params `peak_flops`) is per device (GPU) or per host (CPU). Otherwise: the GPU table above, or on
    CPU a short matmul benchmark on all the host's cores (the best ever seen on this CPU model is kept).
    """
    if world.on_cpu:
        per_host = override or measured_cpu_peak(bf16)
        return per_host * world.hosts
    if override:
        return override * world.size
    import torch

    name = torch.cuda.get_device_name(world.device)
    for fragment, flops in GPU_PEAK_BF16:
        if fragment in name:
            return flops * world.size
    return float("nan")  # unknown device: MFU is reported as NaN rather than guessed


def _cache_file() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "scratchlm" / "peak_flops.json"


def measured_cpu_peak(bf16: bool, size: int = 1024, seconds: float = 0.5) -> float:
    """Best matmul FLOP/s of this host on all its cores: measured briefly on every call and kept as the best ever
    seen in ~/.cache/scratchlm/peak_flops.json, so a measurement taken on a busy machine does not stick."""
    import torch

    cores = usable_cores()
    dtype = torch.bfloat16 if bf16 else torch.float32
    key = f"{platform.machine()}|{_cpu_model()}|cores={cores}|{dtype}|n={size}"
    cache = _cache_file()
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(cores)
    try:
        a = torch.randn(size, size, dtype=dtype)
        b = torch.randn(size, size, dtype=dtype)
        a @ b  # warm up the kernels
        best, deadline = 0.0, time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            for _ in range(4):
                a @ b
            best = max(best, 4 * 2 * size**3 / (time.perf_counter() - start))
    finally:
        torch.set_num_threads(threads)
    best = max(best, float(known.get(key, 0.0)))
    known[key] = best
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known, indent=2))
        os.replace(tmp, cache)
    except OSError:
        pass  # a read-only home only loses the memory of better measurements
    return best


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def format_flops(x: float) -> str:
    if not math.isfinite(x):
        return "unknown"
    for unit, scale in (("PFLOP/s", 1e15), ("TFLOP/s", 1e12), ("GFLOP/s", 1e9)):
        if x >= scale:
            return f"{x / scale:.1f} {unit}"
    return f"{x:.0f} FLOP/s"
