"""The project's default data: a seeded multi-domain synthetic pool and a reference set.

Eight domains, each with its own vocabulary and sentence style. The reference set is written in
the style of two of them (narrative fiction and popular science, the way LAMBADA is narrative
text), so a selection that finds those domains is measurably different from a random one. Within
every domain a share of documents is degraded (shuffled word order or repeated boilerplate) so
that quality varies inside clusters too, as in the paper's Fig. 1.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from quadlib.settings import setting


@dataclass(frozen=True)
class Domain:
    """A domain's vocabulary slots and the sentence templates that use them."""

    name: str
    slots: dict[str, tuple[str, ...]]
    templates: tuple[str, ...]


_NAMES = ("Mara", "Tobias", "Elena", "Rafe", "Ines", "Corwin", "Lydia", "Owen", "Sela", "Bram")

DOMAINS: tuple[Domain, ...] = (
    Domain("fiction", {
        "name": _NAMES,
        "place": ("the old mill", "the harbour", "the attic", "the orchard", "the lighthouse", "the kitchen",
                  "the station", "the garden gate", "the frozen lake", "the narrow stair"),
        "feeling": ("afraid", "restless", "relieved", "ashamed", "hopeful", "furious", "tired", "curious"),
        "object": ("letter", "lantern", "key", "photograph", "coat", "knife", "ring", "map", "violin"),
        "verb": ("whispered", "laughed", "hesitated", "turned away", "smiled", "sighed", "shrugged"),
    }, (
        "{name} stood by {place} and felt {feeling}.",
        "\"Where did you find the {object}?\" {name} asked, and {name} {verb}.",
        "When {name} opened the {object}, the room went quiet.",
        "It had been years since {name} had walked to {place}.",
        "{name} {verb} and put the {object} back in the drawer.",
        "Nobody at {place} remembered the {object}, except {name}.",
        "\"I never meant to hurt you,\" {name} said, feeling {feeling}.",
    )),
    Domain("science", {
        "thing": ("the neutron star", "a red dwarf", "the solar wind", "a comet", "the ocean crust",
                  "a protein", "the magnetic field", "a glacier", "the genome", "a galaxy cluster"),
        "process": ("collapses", "radiates heat", "absorbs light", "folds", "erodes", "spins faster",
                    "emits radio waves", "evolves"),
        "scientist": ("astronomers", "geologists", "biologists", "physicists", "chemists"),
        "unit": ("billion years", "million kelvin", "light years", "nanometres", "kilometres per second"),
        "number": ("three", "twelve", "forty", "a hundred", "several thousand"),
    }, (
        "{scientist} observed that {thing} {process} over {number} {unit}.",
        "Because {thing} {process}, {scientist} can estimate its age.",
        "New measurements suggest {thing} is {number} {unit} away.",
        "The reason {thing} {process} was a puzzle for {scientist} until recently.",
        "In the experiment, {scientist} showed how {thing} {process}.",
    )),
    Domain("sports", {
        "team": ("United", "the Rovers", "City", "the Falcons", "Athletic", "the Sharks", "Wanderers"),
        "player": ("the striker", "the goalkeeper", "the captain", "the winger", "the substitute"),
        "score": ("2-1", "3-0", "1-1", "4-2", "0-0"),
        "minute": ("12th", "37th", "58th", "71st", "89th", "90th"),
        "action": ("scored a header", "was sent off", "hit the post", "saved a penalty", "equalised"),
    }, (
        "{team} beat {team} {score} on Saturday.",
        "In the {minute} minute {player} {action}.",
        "The manager praised {player} after the {score} draw.",
        "{team} are now third in the league table.",
        "Fans applauded as {player} {action} in the {minute} minute.",
    )),
    Domain("finance", {
        "company": ("Nortech", "Alvara Holdings", "Brightline Bank", "Qorium", "Helix Energy", "Maple Retail"),
        "metric": ("quarterly revenue", "net profit", "operating margin", "earnings per share", "dividend"),
        "move": ("rose", "fell", "climbed", "slipped", "jumped", "declined"),
        "pct": ("2.1 percent", "4.5 percent", "0.8 percent", "12 percent", "7.3 percent"),
        "market": ("the bond market", "the stock index", "currency traders", "analysts", "investors"),
    }, (
        "Shares of {company} {move} {pct} after the earnings call.",
        "{company} reported that {metric} {move} {pct} year on year.",
        "{market} expect {metric} to improve next quarter.",
        "The central bank decision left {market} uneasy as yields {move}.",
        "{company} will raise its {metric} guidance, said {market}.",
    )),
    Domain("cooking", {
        "ingredient": ("the onions", "two cloves of garlic", "the butter", "a cup of flour", "the tomatoes",
                       "fresh basil", "the lentils", "a pinch of salt", "the cream"),
        "method": ("saute", "whisk", "simmer", "fold in", "roast", "stir", "knead"),
        "time": ("five minutes", "ten minutes", "half an hour", "two minutes", "an hour"),
        "heat": ("medium heat", "a low flame", "a hot oven", "high heat"),
    }, (
        "{method} {ingredient} over {heat} for {time}.",
        "Add {ingredient} and {method} gently.",
        "Let the sauce rest for {time} before serving.",
        "Season with {ingredient}, then {method} for {time}.",
        "Preheat to {heat} and {method} {ingredient}.",
    )),
    Domain("legal", {
        "party": ("the Licensee", "the Licensor", "the Tenant", "the Supplier", "the Purchaser", "either Party"),
        "duty": ("indemnify", "notify in writing", "maintain insurance", "keep confidential", "pay all fees"),
        "term": ("thirty (30) days", "the Effective Date", "the Term", "termination", "ninety (90) days"),
        "clause": ("Section 4.2", "Clause 7", "Schedule B", "Article 12", "Section 9.1"),
    }, (
        "{party} shall {duty} within {term}.",
        "Subject to {clause}, {party} shall {duty}.",
        "Notwithstanding {clause}, this Agreement survives {term}.",
        "{party} may terminate upon {term} notice pursuant to {clause}.",
        "Failure by {party} to {duty} constitutes a material breach of {clause}.",
    )),
    Domain("code", {
        "fn": ("parse_config", "load_rows", "merge_sorted", "count_tokens", "normalize_path", "retry_request"),
        "arg": ("items", "path", "values", "records", "text", "timeout"),
        "op": ("sorted", "len", "sum", "list", "set", "max"),
        "ret": ("result", "total", "output", "rows", "cache"),
    }, (
        "def {fn}({arg}):\n    {ret} = {op}({arg})\n    return {ret}",
        "for x in {arg}:\n    {ret}.append({op}(x))",
        "if not {arg}:\n    raise ValueError(\"empty {arg}\")",
        "# {fn}: return the {op} of {arg}",
        "{ret} = {{k: {op}(v) for k, v in {arg}.items()}}",
    )),
    Domain("medicine", {
        "patient": ("The patient", "A 54-year-old man", "A 7-year-old girl", "The subject", "A pregnant woman"),
        "symptom": ("fever", "chest pain", "a persistent cough", "fatigue", "shortness of breath", "a rash"),
        "drug": ("amoxicillin", "ibuprofen", "metformin", "a beta blocker", "oral steroids"),
        "dose": ("500 mg twice daily", "200 mg as needed", "10 mg once daily", "a single dose"),
        "test": ("a blood count", "an ECG", "a chest X-ray", "an MRI", "a urine culture"),
    }, (
        "{patient} presented with {symptom} for three days.",
        "{test} was ordered to rule out infection.",
        "{drug} was prescribed at {dose}.",
        "{patient} reported {symptom} after starting {drug}.",
        "Follow-up with {test} is advised in two weeks.",
    )),
)

REFERENCE_DOMAINS = ("fiction", "science")
_BOILERPLATE = ("Click here to subscribe.", "All rights reserved.", "Share this page.", "Read more.")


@dataclass
class SyntheticSettings:
    docs_per_domain: int = setting(400, "pool documents per domain (8 domains)")
    reference_docs: int = setting(300, "reference documents, drawn from the reference domains' style")
    sentences: tuple[int, int] = setting((5, 14), "min and max sentences per document")
    degraded_share: float = setting(0.2, "share of pool documents degraded (shuffled or boilerplate)")
    seed: int = setting(0, "everything follows from this seed")


def _sentence(domain: Domain, rng: np.random.Generator) -> str:
    template = domain.templates[rng.integers(len(domain.templates))]
    while "{" in template.replace("{{", "").replace("}}", ""):
        for slot, words in domain.slots.items():
            key = "{" + slot + "}"
            if key in template:
                template = template.replace(key, words[rng.integers(len(words))], 1)
                break
        else:
            break
    text = template.replace("{{", "{").replace("}}", "}")
    return text[0].upper() + text[1:] if domain.name != "code" else text


def _document(domain: Domain, rng: np.random.Generator, settings: SyntheticSettings, degrade: bool) -> str:
    n = int(rng.integers(settings.sentences[0], settings.sentences[1] + 1))
    sentences = [_sentence(domain, rng) for _ in range(n)]
    joiner = "\n" if domain.name == "code" else " "
    if not degrade:
        return joiner.join(sentences)
    if rng.random() < 0.5:  # word salad: same vocabulary, no syntax
        words = " ".join(sentences).split()
        rng.shuffle(words)
        return " ".join(words)
    filler = " ".join(_BOILERPLATE[rng.integers(len(_BOILERPLATE))] for _ in range(n))
    return sentences[0] + " " + filler


def generate(settings: SyntheticSettings | None = None) -> tuple[list[dict], list[dict]]:
    """The pool records ({id, text, source}) and the reference records ({id, text})."""
    settings = settings or SyntheticSettings()
    rng = np.random.default_rng(settings.seed)
    pool = []
    for domain in DOMAINS:
        for i in range(settings.docs_per_domain):
            degrade = bool(rng.random() < settings.degraded_share)
            pool.append({"id": f"{domain.name}-{i:05d}", "text": _document(domain, rng, settings, degrade),
                         "source": domain.name})
    order = rng.permutation(len(pool))
    pool = [pool[i] for i in order]
    by_name = {d.name: d for d in DOMAINS}
    reference = []
    for i in range(settings.reference_docs):
        domain = by_name[REFERENCE_DOMAINS[i % len(REFERENCE_DOMAINS)]]
        reference.append({"id": f"ref-{i:05d}", "text": _document(domain, rng, settings, degrade=False)})
    return pool, reference


def write_jsonl_gz(records: list[dict], path: Path) -> None:
    """Byte-reproducible gzip JSON Lines (mtime fixed at 0)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz:
        for rec in records:
            gz.write((json.dumps(rec, ensure_ascii=False) + "\n").encode("utf-8"))


def write_default_data(folder: Path, settings: SyntheticSettings | None = None) -> tuple[Path, Path]:
    """Write `pool.jsonl.gz` and `reference.jsonl.gz` into `folder`; return their paths."""
    pool, reference = generate(settings)
    pool_path, ref_path = folder / "pool.jsonl.gz", folder / "reference.jsonl.gz"
    write_jsonl_gz(pool, pool_path)
    write_jsonl_gz(reference, ref_path)
    return pool_path, ref_path
