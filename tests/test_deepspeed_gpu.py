"""sf_torch.deepspeed on a CUDA GPU: ZeRO 0-3 in fp32, bf16 and fp16 (with an overflow skip).

The same checks as tests/test_deepspeed.py (check_run), on one rank per GPU with NCCL. CI has no
GPU, so these are skipped there; they run on the GPU machine.
"""

import pytest
import torch
from test_deepspeed import check_run, run_deepspeed

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CONFIGS = [dict(stage=s, dtype=d) for d in ("fp32", "bf16", "fp16") for s in (0, 1, 2, 3)]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"zero{c['stage']}-{c['dtype']}")
def test_eval_train_resume_on_gpu(tmp_path, config):
    world = max(1, torch.cuda.device_count())
    check_run(run_deepspeed(tmp_path, device="cuda", world=world, **config), config)
