"""Fault injection for the reliability tests, loaded by every Python process of a run whose
PYTHONPATH includes this folder (mp.spawn's and torchrun's workers too). GPT_DDP_FAULT selects:

    raise:RANK:STEP   the rank raises RuntimeError in its STEP-th optimizer step
    kill-in-save:N    the process writing its N-th checkpoint is SIGKILLed halfway through
"""
import os

FAULT = os.environ.get("GPT_DDP_FAULT", "")

if FAULT:
    import signal

    import torch
    import torch.distributed as dist

    kind, *params = FAULT.split(":")
    calls = {"clip": 0, "save": 0}

    if kind == "raise":
        fail_rank, fail_step = int(params[0]), int(params[1])
        real_clip = torch.nn.utils.clip_grad_norm_

        def clip_grad_norm_(*args, **kwargs):
            calls["clip"] += 1
            if dist.is_initialized() and dist.get_rank() == fail_rank and calls["clip"] == fail_step:
                raise RuntimeError(f"injected failure on rank {fail_rank} at step {fail_step}")
            return real_clip(*args, **kwargs)
        torch.nn.utils.clip_grad_norm_ = clip_grad_norm_

    if kind == "kill-in-save":
        nth = int(params[0])
        real_save = torch.save

        def save(obj, f, *args, **kwargs):
            if str(f).endswith("ckpt.pt.tmp"):
                calls["save"] += 1
                if calls["save"] == nth:
                    real_save(obj, f, *args, **kwargs)
                    with open(f, "r+b") as fh:  # leave half a file behind, as a crash would
                        fh.truncate(os.path.getsize(f) // 2)
                    os.kill(os.getpid(), signal.SIGKILL)
            return real_save(obj, f, *args, **kwargs)
        torch.save = save
