"""The GPU path: NCCL, bf16 autocast, fused AdamW, SDPA with packed-document masks, pinned memory.

Marked `gpu`: deselected by default (`addopts = -m 'not gpu'`); run with `pytest -m gpu tests/gpu`
on a machine with a CUDA device.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from support import generated_spec, write_spec

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def packed_row(documents: list[np.ndarray], seq_len: int) -> dict[str, torch.Tensor]:
    from mixloop.data.packing import Packer, model_inputs

    packer = Packer(seq_len, pad_id=0, split_documents=True)
    rows = [row for doc in documents for row in packer.add(doc, np.ones(len(doc), bool))] + list(packer.flush())
    return model_inputs(*(np.stack([r[i] for r in rows]) for i in range(3)))


def test_bf16_sdpa_keeps_packed_documents_apart_on_the_gpu():
    from transformers import Qwen3Config

    from mixloop.train.model import PRESETS, new_model

    config = Qwen3Config(**PRESETS["small"], vocab_size=512, tie_word_embeddings=True, head_dim=64)
    model = new_model(config, seed=0).cuda().eval()
    rng = np.random.default_rng(0)
    second = rng.integers(3, 512, 40).astype(np.int32)
    logits = []
    for first in (rng.integers(3, 512, 30).astype(np.int32), rng.integers(3, 512, 30).astype(np.int32)):
        inputs = {k: v.cuda() for k, v in packed_row([first, second], 128).items() if k != "labels"}
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            logits.append(model(**inputs).logits[0, 30:70].float())
    torch.testing.assert_close(logits[0], logits[1], atol=2e-2, rtol=2e-2)  # bf16 tolerance


def test_gpu_optimizer_is_fused_and_batches_are_pinned(tmp_path):
    from transformers import Qwen3Config

    from mixloop.config import ResolvedLR, ResolvedStage
    from mixloop.data.store import PackedCorpus, write_shard
    from mixloop.storage.fs import write_json
    from mixloop.train.batches import MicroBatch
    from mixloop.train.checkpoint import optimizer_for
    from mixloop.train.model import PRESETS, new_model

    model = new_model(Qwen3Config(**PRESETS["micro"], vocab_size=256, head_dim=16), seed=0).cuda()
    stage = ResolvedStage.model_construct(weight_decay=0.1, lr=ResolvedLR.model_construct(peak=1e-3))
    assert optimizer_for(model, stage, torch.device("cuda")).defaults["fused"] is True

    rows = [(np.arange(16, dtype=np.int32), np.ones(16, bool), np.ones(16, np.int16))] * 4
    write_shard(str(tmp_path), "s0", rows)
    write_json(str(tmp_path / "manifest.json"), {"seq_len": 16, "shards": [{"name": "s0", "rows": 4}]})
    batch = MicroBatch([PackedCorpus(str(tmp_path))], np.zeros(4, np.int64), np.arange(4), pin_memory=True)
    assert all(tensor.is_pinned() for tensor in batch.inputs.values())


def test_a_stage_trains_on_one_gpu_in_bf16(ray_address, tmp_path):
    from mixloop.config import load_spec
    from mixloop.runs.pipeline import PipelineRunner

    stage = {"name": "gpu", "mixture": {"facts": 0.75, "chats": 0.25}, "tokens": 20480}
    spec = write_spec(tmp_path, generated_spec(tmp_path / "run", [stage], workers=1, use_gpu=True))
    PipelineRunner(load_spec(spec)).run()
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["step"] == 20 and logged[-1]["loss"] < logged[0]["loss"]
    assert logged[-1]["peak_memory_mb"] > 0  # torch.cuda.max_memory_allocated on the worker
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "models" / "gpu")
    assert next(model.parameters()).dtype == torch.float32  # versions are saved in fp32
