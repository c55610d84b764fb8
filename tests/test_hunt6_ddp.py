"""Evaluation on several processes (DDP, gloo on CPU) reports the numbers of a one-process evaluation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from m2ist.data.collator import RECCollator
from m2ist.trainer import RECTrainer, RECTrainingArguments
from tests.ddp_worker import make_dataset, make_model, make_processor

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")


def _torchrun(*arguments: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(REPO / "tests" / "ddp_worker.py"), *arguments]
    result = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.mark.slow
def test_two_process_evaluation_of_a_set_the_sampler_pads_scores_each_sample_once(tmp_path):
    # 7 samples on 2 ranks x batch 2: the distributed sampler repeats one sample to fill rank 1's last batch
    _torchrun(str(tmp_path / "ddp"), "eval:7")
    ranks = [json.loads((tmp_path / "ddp" / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    args = RECTrainingArguments(output_dir=str(tmp_path / "single"), use_cpu=True, per_device_eval_batch_size=2,
                                report_to="none", disable_tqdm=True, dataloader_num_workers=0)
    processor = make_processor(tmp_path / "tokenizer")
    single = RECTrainer(make_model(fusion_dropout=0.0), args, data_collator=RECCollator(processor),
                        eval_dataset=make_dataset(7, seed=3)).evaluate()
    for metrics in ranks:
        for name in ("eval_acc@0.5", "eval_miou", "eval_loss_box", "eval_loss_giou", "eval_loss"):
            assert metrics["full"][name] == pytest.approx(single[name], rel=1e-5, abs=1e-6), name
        assert metrics["loss_only"]["eval_loss"] == pytest.approx(single["eval_loss"], rel=1e-5, abs=1e-6)
