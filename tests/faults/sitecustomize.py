"""Test-only hooks, loaded by every Python process of a run whose PYTHONPATH includes this folder
(mp.spawn's and torchrun's workers too). They watch and break the run from outside the code under
test, through torch's own functions, so that a test does not have to believe what the scripts
print about themselves.

GPT_DDP_FAULT selects one fault:

    raise:RANK:STEP     the rank raises RuntimeError in its STEP-th optimizer step
    kill:RANK:STEP      the rank SIGKILLs itself in its STEP-th step (not after a torchrun restart)
    sigterm:STEP        rank 0 sends SIGTERM to its parent (mp.spawn's) in its STEP-th step, as a
                        scheduler that signals the job's main process would
    perturb:RANK:STEP   the rank adds 1e-3 to one weight in its STEP-th step: its replica differs
    kill-in-save:N      the process writing its N-th checkpoint is SIGKILLed halfway through
    fake-gpus:N         torch says that N CUDA GPUs (compute capability 8.0) are visible
    cpu-bf16:0|1        torch says that this CPU computes bf16 natively (1) or not (0)
    slow-tokenize:S     tokenizing a text takes S seconds longer (data.encode_text sleeps first)
    fail-argv:TEXT      a process whose command line holds TEXT exits with code 1 at once
    slow-loss:RANK:S    the rank's first loss (torch.nn.functional.cross_entropy) comes S seconds late,
                        and so does its first without gradients (evaluation), as after compilations
                        slower than the other ranks'
    torch-version:RANK:V  torch says its version is V in the process started with RANK in its
                        environment (a launcher's rank: mp.spawn's workers get theirs later)
    bad-sum:RANK        the rank's dist.all_reduce adds 1 to the last element of every result of
                        more than one element, as a link or a build that corrupts data would

("the STEP-th step" counts calls of torch.nn.utils.clip_grad_norm_, once per optimizer step.)

GPT_DDP_HOLD=DIR holds each mp.spawn worker before it imports anything: it writes DIR/held-PID
and waits for DIR/release. So a test can signal the job while its workers are still starting.

GPT_DDP_PROBE=DIR records, for each rank, in DIR/rank-R.jsonl, one JSON object a line:
    {"kind": "allreduce", "step": S, "dtype": ..., "numel": N, "bytes": B}   every dist.all_reduce
    {"kind": "grad_norm", "step": S, "value": ...}   what clip_grad_norm_ returned (pre-clip norm)
    {"kind": "order", "epoch": E, "indices": [...]}  each DistributedSampler pass, its indices
    {"kind": "zero_grad", "step": S, "kept": bool, "storages": N}   after each zero_grad: whether
        every parameter still has a gradient, and in how many storages the gradients lie
    {"kind": "final", "sha256": ..., "buckets": [...], "steps": S}   at destroy_process_group: the
        hash of the DDP-wrapped module's weights on this rank, DDP's gradient bucket sizes
S is the optimizer step under way, from 1 (DDP's bucket all-reduces of step S run in its backward,
before clip_grad_norm_; an all-reduce after the S-th clipping counts as S + 1).
"""
import os
import sys

FAULT = os.environ.get("GPT_DDP_FAULT", "")
HOLD = os.environ.get("GPT_DDP_HOLD", "")
PROBE = os.environ.get("GPT_DDP_PROBE", "")
ARGV = " ".join(getattr(sys, "orig_argv", sys.argv))

if FAULT.startswith("fail-argv:") and FAULT.split(":", 1)[1] in ARGV:
    print(f"injected failure: the command line holds {FAULT.split(':', 1)[1]}", file=sys.stderr,
          flush=True)
    os._exit(1)

if HOLD and "spawn_main" in ARGV:  # an mp.spawn worker, before it imports torch
    import time
    open(os.path.join(HOLD, f"held-{os.getpid()}"), "w").close()
    while not os.path.exists(os.path.join(HOLD, "release")):
        time.sleep(0.01)

if (FAULT or PROBE) and "resource_tracker" not in ARGV:
    import hashlib
    import json
    import signal

    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    from torch.utils.data.distributed import DistributedSampler

    kind, *params = FAULT.split(":")
    calls = {"clip": 0, "save": 0}
    ddp_modules = []

    def rank():
        return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))

    def record(**fields):
        if PROBE:
            with open(os.path.join(PROBE, f"rank-{rank()}.jsonl"), "a") as f:
                f.write(json.dumps(fields) + "\n")

    real_clip = torch.nn.utils.clip_grad_norm_

    def clip_grad_norm_(parameters, *args, **kwargs):
        parameters = list(parameters)
        calls["clip"] += 1
        step, me = calls["clip"], rank()
        first_start = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) == 0
        if kind == "raise" and me == int(params[0]) and step == int(params[1]):
            raise RuntimeError(f"injected failure on rank {me} at step {step}")
        if kind == "kill" and me == int(params[0]) and step == int(params[1]) and first_start:
            os.kill(os.getpid(), signal.SIGKILL)
        if kind == "sigterm" and me == 0 and step == int(params[0]):
            os.kill(os.getppid(), signal.SIGTERM)
        if kind == "perturb" and me == int(params[0]) and step == int(params[1]):
            with torch.no_grad():
                parameters[0].view(-1)[0] += 1e-3
        norm = real_clip(parameters, *args, **kwargs)
        record(kind="grad_norm", step=step, value=float(norm))
        return norm
    torch.nn.utils.clip_grad_norm_ = clip_grad_norm_

    if PROBE:
        real_all_reduce = dist.all_reduce

        def all_reduce(tensor, *args, **kwargs):  # what goes on the wire, as handed to Gloo
            record(kind="allreduce", step=calls["clip"] + 1, dtype=str(tensor.dtype).split(".")[-1],
                   numel=tensor.numel(), bytes=tensor.numel() * tensor.element_size())
            return real_all_reduce(tensor, *args, **kwargs)
        dist.all_reduce = all_reduce

        real_zero_grad = torch.optim.Optimizer.zero_grad

        def zero_grad(self, *args, **kwargs):
            real_zero_grad(self, *args, **kwargs)
            grads = [p.grad for group in self.param_groups for p in group["params"]]
            record(kind="zero_grad", step=calls["clip"], kept=all(g is not None for g in grads),
                   storages=len({g.untyped_storage().data_ptr() for g in grads if g is not None}))
        torch.optim.Optimizer.zero_grad = zero_grad

        real_iter = DistributedSampler.__iter__

        def sampler_iter(self):
            indices = list(real_iter(self))
            record(kind="order", epoch=self.epoch, indices=indices)
            return iter(indices)
        DistributedSampler.__iter__ = sampler_iter

        real_ddp_init = DistributedDataParallel.__init__

        def ddp_init(self, *args, **kwargs):
            real_ddp_init(self, *args, **kwargs)
            ddp_modules.append(self)
        DistributedDataParallel.__init__ = ddp_init

        real_destroy = dist.destroy_process_group

        def destroy_process_group(*args, **kwargs):
            for ddp in ddp_modules:
                digest = hashlib.sha256()
                for tensor in ddp.module.state_dict().values():
                    digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
                data = ddp._get_ddp_logging_data()
                sizes = data.get("rebuilt_bucket_sizes") or data.get("bucket_sizes") or ""
                record(kind="final", sha256=digest.hexdigest(), steps=calls["clip"],
                       buckets=[int(s) for s in str(sizes).split(",") if s.strip()])
            return real_destroy(*args, **kwargs)
        dist.destroy_process_group = destroy_process_group

    if kind == "kill-in-save":
        nth = int(params[0])
        real_save = torch.save

        def save(obj, f, *args, **kwargs):
            name = str(getattr(f, "name", f))  # a path, or the file object it was opened as
            if name.endswith("ckpt.pt.tmp"):
                calls["save"] += 1
                if calls["save"] == nth:
                    real_save(obj, f, *args, **kwargs)
                    if hasattr(f, "flush"):
                        f.flush()
                    with open(name, "r+b") as fh:  # leave half a file behind, as a crash would
                        fh.truncate(os.path.getsize(name) // 2)
                    os.kill(os.getpid(), signal.SIGKILL)
            return real_save(obj, f, *args, **kwargs)
        torch.save = save

    if kind == "slow-loss":
        import time
        real_cross_entropy = torch.nn.functional.cross_entropy

        def cross_entropy(*args, **kwargs):
            mode = "loss" if torch.is_grad_enabled() else "eval-loss"
            if rank() == int(params[0]) and not calls.get(mode):
                calls[mode] = 1
                time.sleep(float(params[1]))
            return real_cross_entropy(*args, **kwargs)
        torch.nn.functional.cross_entropy = cross_entropy

    if kind == "torch-version" and os.environ.get("RANK") == params[0]:
        torch.__version__ = torch.torch_version.TorchVersion(params[1])

    if kind == "bad-sum":
        sound_all_reduce = dist.all_reduce

        def corrupt_all_reduce(tensor, *args, **kwargs):
            work = sound_all_reduce(tensor, *args, **kwargs)
            if rank() == int(params[0]) and tensor.numel() > 1:
                tensor.view(-1)[-1] += 1
            return work
        dist.all_reduce = corrupt_all_reduce

    if kind == "slow-tokenize":
        import time

        import data
        real_encode = data.encode_text

        def encode_text(*args, **kwargs):
            time.sleep(float(params[0]))
            return real_encode(*args, **kwargs)
        data.encode_text = encode_text

    if kind == "fake-gpus":
        n_gpus = int(params[0])
        torch.cuda.is_available = lambda: True
        torch.cuda.device_count = lambda: n_gpus
        torch.cuda.get_device_capability = lambda device=None: (8, 0)

    if kind == "cpu-bf16":
        native = params[0] == "1"
        torch.cpu._is_avx512_bf16_supported = lambda: native
        torch.cpu._is_amx_tile_supported = lambda: native
