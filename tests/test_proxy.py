"""Proxy model: configs, tokenizer, batching and loss convention, training, exact resume, warm-up step."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, GPTNeoXConfig
from transformers.pytorch_utils import Conv1D

from quadlib.proxy import (
    IGNORE_INDEX,
    MODEL_CONFIGS,
    TrainSettings,
    build_model,
    causal_lm_loss,
    context_length,
    count_parameters,
    encode_documents,
    latest_checkpoint,
    load_model_checkpoint,
    load_tokenizer,
    model_config,
    pack_blocks,
    pad_batch,
    save_model,
    train_bpe_tokenizer,
    train_lm,
    warmup_cosine,
    warmup_proxy,
)
from quadlib.proxy.train import batch_indices

TEXTS = [
    f"Document {i}: the {color} fox jumps over the lazy dog {i % 7} times. "
    f"Prices rose by {i * 3 % 11} percent in the {season} quarter, naïve café ünïcode 日本 {i}."
    for i, (color, season) in enumerate(
        (c, s) for c in ("red", "brown", "grey", "white", "black") for s in ("spring", "summer", "autumn", "winter"))
]
TEXTS = TEXTS * 3  # 60 short documents, about 2,000 tokens


def tiny_settings(**changes: object) -> TrainSettings:
    values = {"total_steps": 6, "batch_size": 4, "block_size": 32, "warmup_steps": 2, "checkpoint_every": 2,
              "lr": 3e-3, "keep_checkpoints": 0, "device": "cpu"}
    return TrainSettings(**(values | changes))


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: one thread is fastest


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    return train_bpe_tokenizer(TEXTS, 320, tmp_path_factory.mktemp("tok") / "tokenizer")


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# -- configs -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(set(MODEL_CONFIGS) - {"paper-1.3b"}))  # paper-1.3b: meta device below
def test_named_config_builds_and_runs(name: str, tokenizer) -> None:
    model = build_model(name, tokenizer=tokenizer, device="cpu")
    assert model.get_input_embeddings().num_embeddings == len(tokenizer)
    assert model.config.eos_token_id == tokenizer.eos_token_id and model.config.pad_token_id == tokenizer.pad_token_id
    ids = torch.tensor([[tokenizer.bos_token_id, 5, 6, tokenizer.eos_token_id]])
    assert model(input_ids=ids).logits.shape == (1, 4, len(tokenizer))
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    if "llama" in name:
        assert {"q_proj", "k_proj", "v_proj", "o_proj"} <= names
    else:
        assert isinstance(model.transformer.h[0].attn.c_attn, Conv1D)


def test_tiny_llama_is_the_stated_size() -> None:
    config = model_config("tiny-llama", 8192)
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads) == (4, 256, 4)
    assert config.intermediate_size == 688 and config.max_position_embeddings == 256
    assert 3e6 < count_parameters("tiny-llama", 1000) < 6e6


def test_paper_config_is_1_3b_on_meta_device() -> None:
    config = model_config("paper-1.3b")
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads) == (24, 2048, 16)
    assert config.max_position_embeddings == 1024 and config.vocab_size == 32000
    assert config.rope_parameters["rope_type"] == "default"
    assert 1.25e9 < count_parameters("paper-1.3b") < 1.40e9


def test_build_model_seed_is_deterministic_and_leaves_global_rng(tokenizer) -> None:
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = build_model("test-llama", tokenizer=tokenizer, seed=3)
    b = build_model("test-llama", tokenizer=tokenizer, seed=3)
    c = build_model("test-llama", tokenizer=tokenizer, seed=4)
    assert torch.equal(torch.get_rng_state(), before)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)


def test_saved_model_reloads_by_path(tmp_path: Path, tokenizer) -> None:
    model = build_model("test-gpt2", tokenizer=tokenizer).eval()
    save_model(model, tokenizer, tmp_path / "model")
    assert (tmp_path / "model" / "model.safetensors").exists()
    reloaded = build_model(str(tmp_path / "model"), tokenizer=load_tokenizer(tmp_path / "model")).eval()
    ids = torch.tensor([[1, 40, 41, 42, 2]])
    assert torch.equal(model(input_ids=ids).logits, reloaded(input_ids=ids).logits)


def test_pythia_layout_loads_through_the_path_route(tmp_path: Path) -> None:
    config = GPTNeoXConfig(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=64)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "pythia")
    model = build_model(str(tmp_path / "pythia"))
    assert type(model).__name__ == "GPTNeoXForCausalLM" and context_length(model) == 64
    assert any(n.endswith("query_key_value") for n, _ in model.named_modules())


def test_unknown_model_names_the_options() -> None:
    with pytest.raises(ValueError, match="not a named config"):
        build_model("/nonexistent/folder/of/a/model")


# -- tokenizer -----------------------------------------------------------------------------------------
def test_tokenizer_round_trips_and_reloads(tokenizer, tmp_path: Path) -> None:
    text = "Prices rose by 7 percent, naïve café 日本 — tabs\tand\nnewlines."
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert tokenizer.decode(ids) == text
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    reloaded = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    assert reloaded(text, add_special_tokens=False).input_ids == ids


def test_tokenizer_training_is_deterministic(tmp_path: Path) -> None:
    first = train_bpe_tokenizer(TEXTS, 300, tmp_path / "a")
    second = train_bpe_tokenizer(TEXTS, 300, tmp_path / "b")
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()
    assert first(TEXTS[5]).input_ids == second(TEXTS[5]).input_ids


def test_tokenizer_rejects_a_vocabulary_below_the_byte_alphabet(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="too small"):
        train_bpe_tokenizer(TEXTS, 200, tmp_path / "tok")


# -- batching and the loss convention ---------------------------------------------------------------------
def test_encode_frames_and_truncates(tokenizer) -> None:
    full, cut = encode_documents(tokenizer, [TEXTS[0], TEXTS[0]], None), encode_documents(tokenizer, [TEXTS[0]], 8)
    assert full[0][0] == tokenizer.bos_token_id and full[0][-1] == tokenizer.eos_token_id
    assert cut[0] == full[0][:7] + [tokenizer.eos_token_id]


def test_padding_is_masked_in_labels_and_loss(tokenizer) -> None:
    seqs = encode_documents(tokenizer, ["short", TEXTS[1]], 40)
    batch = pad_batch(seqs, tokenizer.pad_token_id)
    assert batch["input_ids"].shape == (2, len(seqs[1]))
    pad = batch["attention_mask"] == 0
    assert pad.any() and bool((batch["labels"][pad] == IGNORE_INDEX).all())
    assert bool((batch["labels"][~pad] == batch["input_ids"][~pad]).all())

    model = build_model("test-llama", tokenizer=tokenizer).eval()
    with torch.no_grad():
        padded = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        alone = model(input_ids=torch.tensor([seqs[0]]))
    per_doc = causal_lm_loss(padded.logits, batch["labels"], "per_sequence")  # [2]
    torch.testing.assert_close(per_doc[0], causal_lm_loss(alone.logits, torch.tensor([seqs[0]])), rtol=1e-5,
                               atol=1e-5)
    hf_loss = model(**batch).loss  # Hugging Face's own mean over predicted tokens
    torch.testing.assert_close(causal_lm_loss(padded.logits, batch["labels"]), hf_loss, rtol=1e-5, atol=1e-5)
    predicted = torch.tensor([len(s) - 1 for s in seqs], dtype=torch.float32)
    torch.testing.assert_close(causal_lm_loss(padded.logits, batch["labels"], "sum"), (per_doc * predicted).sum())


def test_one_framing_in_training_evaluation_influence_perplexity_and_probes(tokenizer) -> None:
    """Issue 13: every consumer frames a document as [bos] text [eos] and gets the same loss from it.

    Before the unification the scorer framed "text eos" and the probes/perplexity "text": the token
    ids below differed in their first token, and their losses by a whole predicted token.
    """
    from quadlib.evaluation.lm_metrics import LMMetricSettings, text_losses
    from quadlib.influence.scorer import InfluenceScorer
    from quadlib.proxy import document_losses
    from quadlib.selection.probes import HFProbeModel

    texts, max_length = [TEXTS[0], "short", TEXTS[5] + TEXTS[6]], 48
    framed = encode_documents(tokenizer, texts, max_length)
    assert all(ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id for ids in framed)
    model = build_model("test-llama", tokenizer=tokenizer, device="cpu").eval()
    scorer = InfluenceScorer(model, tokenizer, "dot", max_length=max_length, device="cpu")
    assert [scorer.tokenize(text) for text in texts] == framed
    probe = HFProbeModel(model, tokenizer, texts[:1], max_length=max_length, device="cpu")
    expected = pad_batch(framed, tokenizer.pad_token_id)
    assert torch.equal(next(probe._batches(texts))["input_ids"], expected["input_ids"])
    with torch.no_grad():
        losses = document_losses(model, expected).double().numpy()  # [3]
    np.testing.assert_allclose(probe.doc_losses(texts), losses, rtol=1e-5)  # perplexity baseline, MATES probes
    whole = [t for t, ids in zip(texts, framed, strict=True) if len(ids) < max_length]  # evaluation keeps it whole
    evaluated = text_losses(model, tokenizer, whole, LMMetricSettings(max_length=max_length)).doc_mean_losses
    np.testing.assert_allclose(evaluated, losses[[texts.index(t) for t in whole]], rtol=1e-5)


def test_pack_blocks_keeps_the_token_stream() -> None:
    blocks = pack_blocks([[1, 5, 6, 2], [1, 7, 2], [1, 8, 9, 9, 2]], 4)
    assert blocks.tolist() == [[1, 5, 6, 2], [1, 7, 2, 1], [8, 9, 9, 2]]
    with pytest.raises(ValueError, match="do not fill one block"):
        pack_blocks([[1, 2]], 4)


# -- schedule and data order ------------------------------------------------------------------------------
def test_warmup_then_cosine_schedule() -> None:
    lrs = [warmup_cosine(s, warmup_steps=4, total_steps=20, min_lr_ratio=0.1) for s in range(20)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:]))
    assert math.isclose(warmup_cosine(20, 4, 20, 0.1), 0.1)


def test_data_order_covers_each_epoch_and_follows_the_seed() -> None:
    epoch = [batch_indices(s, 10, 3, seed=0) for s in range(3)]  # 3 full batches of 10 blocks, 1 left out
    assert len({int(i) for b in epoch for i in b}) == 9
    assert not all((a == b).all() for a, b in zip(epoch, [batch_indices(s, 10, 3, seed=1) for s in range(3)]))
    assert (batch_indices(3, 10, 3, seed=0) != epoch[0]).any()  # the next epoch is reshuffled


def test_steps_follow_total_then_budget_then_epochs() -> None:
    assert TrainSettings(total_steps=7, token_budget=10**6).steps_for(100) == 7
    assert TrainSettings(token_budget=1000, batch_size=4, block_size=32).steps_for(100) == 8
    assert TrainSettings(epochs=2.0, batch_size=4).steps_for(10) == 4


# -- training ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["test-llama", "test-gpt2"])
def test_both_layouts_learn(name: str, tokenizer, tmp_path: Path) -> None:
    model = build_model(name, tokenizer=tokenizer)
    result = train_lm(model, tokenizer, TEXTS, tiny_settings(total_steps=16, checkpoint_every=100), tmp_path,
                      progress=False)
    assert len(result.losses) == 16 and result.tokens_seen == 16 * 4 * 32
    assert sum(result.losses[-4:]) / 4 < result.losses[0] - 1.0


def _dropout_gpt2(tokenizer) -> torch.nn.Module:
    """A GPT-2 with dropout, so an exact resume also needs the restored RNG state."""
    config = model_config("test-gpt2", len(tokenizer))
    config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = 0.1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(config)


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("make", [lambda tok: build_model("test-llama", tokenizer=tok), _dropout_gpt2],
                         ids=["llama", "gpt2-dropout"])
def test_resume_equals_uninterrupted_training(make, tokenizer, tmp_path: Path) -> None:
    settings = tiny_settings()
    straight = make(tokenizer)
    expected = train_lm(straight, tokenizer, TEXTS, settings, tmp_path / "straight", progress=False)

    def crash_at_step_5(step: int, loss: float) -> None:
        if step == 5:
            raise Interrupt

    interrupted = make(tokenizer)
    with pytest.raises(Interrupt):
        train_lm(interrupted, tokenizer, TEXTS, settings, tmp_path / "resumed", progress=False, on_step=crash_at_step_5)
    resumed = make(tokenizer)  # a fresh process would rebuild the model before resuming
    result = train_lm(resumed, tokenizer, TEXTS, settings, tmp_path / "resumed", progress=False)
    assert result.resumed_from == 4
    assert result.losses == expected.losses
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_gradient_accumulation_takes_the_same_step(tokenizer) -> None:
    """micro_batch_size splits the batch, not the step: the loss and the SGD update match one pass.

    SGD (not Adam, which hides a scaled gradient) and no clipping, so a mean per micro-batch summed
    over 4 micro-batches (a 4x step) or a missing division would show in the weights.
    """
    from quadlib.proxy import optimizer_step

    batch = pack_blocks(encode_documents(tokenizer, TEXTS[:12], None), 24)[:4]  # [4, 24]

    def step(micro: int | None) -> tuple[float, list[torch.Tensor]]:
        model = build_model("test-llama", tokenizer=tokenizer, seed=3)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
        loss = optimizer_step(model, optimizer, scheduler, batch, grad_clip=0.0, micro_batch_size=micro)
        return loss, [p.detach().clone() for p in model.parameters()]

    (whole_loss, whole), (split_loss, split) = step(None), step(1)
    assert split_loss == pytest.approx(whole_loss, rel=1e-6)
    initial = build_model("test-llama", tokenizer=tokenizer, seed=3).state_dict().values()
    assert any(not torch.equal(a, b) for a, b in zip(whole, initial, strict=True)), "the step moved nothing"
    for a, b in zip(whole, split, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="micro_batch_size"):
        TrainSettings(micro_batch_size=0)


def test_checkpoints_are_safetensors_and_json(tokenizer, tmp_path: Path) -> None:
    model = build_model("test-llama", tokenizer=tokenizer)
    train_lm(model, tokenizer, TEXTS, tiny_settings(keep_checkpoints=2), tmp_path, progress=False)
    folders = sorted(p.name for p in tmp_path.iterdir())
    assert folders == ["step-00000004", "step-00000006"]
    files = {p.name for p in tmp_path.rglob("*") if p.is_file()}
    assert files == {"model.safetensors", "optimizer.safetensors", "state.json"}
    last = latest_checkpoint(tmp_path)
    assert json.loads((last / "state.json").read_text())["step"] == 6
    assert any(k.endswith("exp_avg_sq") for k in load_file(str(last / "optimizer.safetensors")))
    fresh = load_model_checkpoint(build_model("test-llama", tokenizer=tokenizer, seed=9), last)
    assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), model.parameters(), strict=True))


def test_resume_refuses_other_settings(tokenizer, tmp_path: Path) -> None:
    train_lm(build_model("test-llama", tokenizer=tokenizer), tokenizer, TEXTS, tiny_settings(total_steps=2), tmp_path,
             progress=False)
    with pytest.raises(ValueError, match="different settings"):
        train_lm(build_model("test-llama", tokenizer=tokenizer), tokenizer, TEXTS,
                 tiny_settings(total_steps=2, lr=1e-2), tmp_path, progress=False)


def test_too_little_text_is_a_clear_error(tokenizer, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="batch_size"):
        train_lm(build_model("test-llama", tokenizer=tokenizer), tokenizer, TEXTS[:2], tiny_settings(), tmp_path)


# -- the proxy step ---------------------------------------------------------------------------------------
def test_warmup_proxy_trains_once_then_skips(store, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = tiny_settings(total_steps=3)
    model, tokenizer = warmup_proxy(store, TEXTS, "test-llama", 300, settings, progress=False)
    proxy = store.root / "proxy"
    assert (proxy / "model" / "model.safetensors").exists() and (proxy / "tokenizer" / "tokenizer.json").exists()
    assert len(json.loads((proxy / "train.json").read_text())["losses"]) == 3 and not model.training

    def must_not_train(*args: object, **kwargs: object) -> None:
        raise AssertionError("a finished warm-up must be skipped")

    monkeypatch.setattr("quadlib.proxy.warmup.train_lm", must_not_train)
    again, tokenizer_again = warmup_proxy(store, TEXTS, "test-llama", 300, settings, progress=False)
    assert tokenizer_again(TEXTS[0]).input_ids == tokenizer(TEXTS[0]).input_ids
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters(), strict=True))
    with pytest.raises(AssertionError, match="skipped"):  # changed settings recompute
        warmup_proxy(store, TEXTS, "test-llama", 300, tiny_settings(total_steps=4), progress=False)


def test_warmup_proxy_needs_a_tokenizer_for_named_configs(store) -> None:
    with pytest.raises(ValueError, match="tokenizer_vocab"):
        warmup_proxy(store, TEXTS, "test-llama", None, tiny_settings())



def test_pretrained_model_refuses_a_trained_tokenizer(store) -> None:
    """A hub/folder/packaged model keeps its own tokenizer: a trained BPE's ids would not match its embeddings."""
    for name in ("smollm2-135m", "HuggingFaceTB/SmolLM2-135M", str(store.root / "some-folder")):
        with pytest.raises(ValueError, match="needs its own tokenizer.*tokenizer_vocab to None"):
            warmup_proxy(store, TEXTS, name, 4096, tiny_settings())


def test_folder_model_keeps_its_tokenizer_and_skips_warmup(store, tokenizer, tmp_path: Path) -> None:
    """A pretrained folder (the hub path's local twin) is stored as it is: no training, its own tokenizer."""
    source = build_model("test-llama", tokenizer=tokenizer, seed=4)
    save_model(source, tokenizer, tmp_path / "pretrained")
    model, own = warmup_proxy(store, TEXTS, str(tmp_path / "pretrained"), None, tiny_settings(), progress=False)
    assert own("naïve café", add_special_tokens=False).input_ids == tokenizer("naïve café",
                                                                              add_special_tokens=False).input_ids
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), source.state_dict().values(), strict=True))
    assert store.done_info("proxy")["warmup"] == "skipped: pretrained model"
    assert not (store.step_dir("proxy") / "checkpoints").exists()


def test_warmup_proxy_resumes_after_a_crash(store, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = tiny_settings(total_steps=3)

    def crash(*args: object, **kwargs: object) -> None:
        raise Interrupt

    monkeypatch.setattr("quadlib.proxy.warmup.save_model", crash)  # dies after training, before the marker
    with pytest.raises(Interrupt):
        warmup_proxy(store, TEXTS, "test-llama", 300, settings, progress=False)
    monkeypatch.undo()
    warmup_proxy(store, TEXTS, "test-llama", 300, settings, progress=False)
    train = json.loads((store.root / "proxy" / "train.json").read_text())
    assert train["resumed_from"] == 3 and len(train["losses"]) == 3  # continued from the last checkpoint
