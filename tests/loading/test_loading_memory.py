"""Loading is memory-frugal: peak RSS added by `moeinfer.load` stays under 1.3x the weight bytes.

Measured in a fresh subprocess: RSS after imports (baseline) and the process's peak RSS (VmHWM) after
load, after torch has started up (see PROBE: a fixed ~75 MB paid once per process, reported apart).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

PROBE = r"""
import json, sys
import torch, moeinfer, moeinfer.loading.checkpoint, tokenizers, tqdm.auto
def status(key):  # VmHWM is this process's own peak; ru_maxrss would include the forking parent's
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
# torch's one-off start-up, not loading: its first module build maps kernel code and its first meta-device op
# imports the Python meta registrations (~75 MB together, whatever the model's size).
torch.nn.Embedding(10, 10)(torch.tensor([1]))
torch.nn.Embedding(10, 10, device="meta")
base = status("VmRSS:")
model = moeinfer.load(sys.argv[1], dtype=sys.argv[2], progress=False)
peak = status("VmHWM:")
weights = sum(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps({"base": base, "peak": peak, "weights": weights}))
"""


@pytest.fixture(scope="module")
def big_checkpoint(tmp_path_factory):
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(vocab_size=8000, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
                           num_attention_heads=8, num_key_value_heads=4, num_local_experts=8)
    path = tmp_path_factory.mktemp("big")
    torch.manual_seed(0)
    MixtralForCausalLM(config).save_pretrained(path)
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    assert size >= 200 * 1024**2
    return path


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_peak_rss_under_1_3x_weights(big_checkpoint, dtype):
    out = subprocess.run([sys.executable, "-c", PROBE, str(big_checkpoint), dtype], capture_output=True,
                         text=True, check=True)
    m = json.loads(out.stdout.strip().splitlines()[-1])
    added = m["peak"] - m["base"]
    ratio = added / m["weights"]
    print(f"\n{dtype}: weights {m['weights'] / 2**20:.0f} MiB, peak RSS added by load {added / 2**20:.0f} MiB "
          f"({ratio:.3f}x); process peak {m['peak'] / 2**20:.0f} MiB")
    assert ratio <= 1.3
