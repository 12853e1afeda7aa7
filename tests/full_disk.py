"""Imported before scripts/train.py runs (tests/test_resume.py): torch.save fails as on a full disk once it has
written FULL_DISK_AFTER files, with the message torch gives for a short write."""

import os

import torch

_save = torch.save
_written = [0]


def _save_until_full(obj, f, *args, **kwargs):
    if _written[0] >= int(os.environ["FULL_DISK_AFTER"]):
        f.write(b"\x80\x02partial")  # a short write leaves some bytes behind
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    _written[0] += 1
    return _save(obj, f, *args, **kwargs)


torch.save = _save_until_full
