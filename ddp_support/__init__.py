"""What keeps a long DDP run safe and observable, for DDP-script.py and DDP-script-torchrun.py.
None of it is DDP itself, and none of it makes the ranks meet: every collective is a call in the
scripts. One concern a module:

- plan.py: the flags, and the plan made from them, the data and the checkpoint before training;
- progress.py: the training position, snapshots (ckpt.pt), the log (metrics.jsonl, loss.png),
  model.pt;
- process.py: a process's life: its start, stop signals, one-line errors, exit codes, and the
  parent that supervises mp.spawn's workers;
- workarounds.py: each workaround for a behaviour of torch, glibc or CPython, with its issue link.
"""
