"""fastai's ``freqhist_bins`` / ``hist_scaled`` as fastai runs them on CPU, for equalise.py.

Runs in a venv with torch (not the node's venv): ``PYTHON fastai_equalise.py VOLUME.npy BINS_OUT.npy REPS``.
Prints one JSON line: best seconds of each function over REPS runs and torch's thread count.

The functions are the few lines of ``fastai.medical.imaging`` (fastai 2.7), re-typed here so
fastai itself (and its dependencies) need not be installed.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import torch
from torch import tensor


def freqhist_bins(self: torch.Tensor, n_bins: int = 100) -> torch.Tensor:
    """fastai: ``Tensor.freqhist_bins``."""
    imsd = self.view(-1).sort()[0]
    t = torch.cat([tensor([0.001]),
                   torch.arange(n_bins).float() / n_bins + (1 / 2 / n_bins),
                   tensor([0.999])])
    t = (len(imsd) * t).long()
    return imsd[t].unique()


def hist_scaled(self: torch.Tensor, brks: torch.Tensor | None = None) -> torch.Tensor:
    """fastai: ``Tensor.hist_scaled`` (the CPU branch; on CUDA fastai calls hist_scaled_pt)."""
    if brks is None:
        brks = freqhist_bins(self)
    ys = np.linspace(0., 1., len(brks))
    x = self.numpy().flatten()
    x = np.interp(x, brks.numpy(), ys)
    return tensor(x).reshape(self.shape).clamp(0., 1.)


def main() -> int:
    volume_path, bins_out, reps = sys.argv[1], sys.argv[2], int(sys.argv[3])
    x = torch.from_numpy(np.load(volume_path))
    assert x.dtype == torch.float32, x.dtype
    bins_times, scaled_times = [], []
    brks = None
    for _ in range(reps):
        started = time.perf_counter()
        brks = freqhist_bins(x)
        bins_times.append(time.perf_counter() - started)
        started = time.perf_counter()
        y = hist_scaled(x, brks)
        scaled_times.append(time.perf_counter() - started)
        del y
    np.save(bins_out, brks.numpy())
    print(json.dumps({"freqhist_bins": min(bins_times), "hist_scaled": min(scaled_times),
                      "torch": torch.__version__, "threads": torch.get_num_threads()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
