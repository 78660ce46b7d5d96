"""The embedded world: planted-concept corpus generator, word-level tokenizer, asset build."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from dlmscope.world import corpus as C
from dlmscope.world import build as B
from dlmscope.world.tokenizer import SPECIAL_TOKENS, build_tokenizer, load_tokenizer, save_tokenizer

WORDS_OF = {w: int(i) for i, w in enumerate(C.NUMBER_WORDS)}
WORDS_OF.update({d: i for i, d in enumerate(C.NUMBER_DIGITS)})


@pytest.fixture(scope="module")
def samples():
    return C.generate(4000, seed=0)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


# ---------------------------------------------------------------------------------------------- corpus

def test_deterministic_per_seed():
    a, b, c = C.generate(300, seed=7), C.generate(300, seed=7), C.generate(300, seed=8)
    assert a == b
    assert [s.text for s in a] != [s.text for s in c]
    assert C.decoding_tasks(50, seed=1) == C.decoding_tasks(50, seed=1)
    assert C.decoding_tasks(50, seed=1) != C.decoding_tasks(50, seed=2)


def test_labels_match_concept_vocabularies(samples):
    owner = {}
    for concept, words in C.CONCEPTS.items():
        for w in words:
            assert w not in owner, f"{w!r} in {owner.get(w)} and {concept}"
            owner[w] = concept
    for s in samples:
        assert s.text == " ".join(s.words)
        assert len(s.labels) == len(s.words)
        for w, lab in zip(s.words, s.labels):
            assert lab == C.concept_of(w)
            if lab is not None:
                assert w in C.CONCEPTS[lab]
    assert C.concept_of("Paris") == "place" and C.concept_of("the") is None


def test_all_concepts_and_kinds_occur(samples):
    stats = C.corpus_stats(samples)
    assert all(n > 0 for n in stats["concept_counts"].values()), stats["concept_counts"]
    assert set(stats["kinds"]) == set(C.KINDS)
    # most concept words actually get used
    used = {w for s in samples for w in s.words}
    for concept, words in C.CONCEPTS.items():
        assert len(used & set(words)) >= 0.8 * len(words), concept
    assert {s.kind for s in C.generate(200, seed=0, mix={"qa": 1.0})} == {"qa"}
    with pytest.raises(ValueError, match="unknown sample kind"):
        C.generate(10, mix={"poem": 1.0})


def test_vocabulary_small_and_complete(samples):
    vocab = set(C.vocabulary())
    assert 300 <= len(vocab) <= 800
    assert {w for s in samples for w in s.words} <= vocab
    assert {w for t in C.decoding_tasks(200, seed=0) for w in t.words} <= vocab


def test_heldout_disjoint_and_unseen(samples):
    train, held = C.split(samples, 0.1, seed=0)
    assert len(train) + len(held) == len(samples)
    assert 0.05 * len(samples) < len(held) < 0.15 * len(samples)
    assert not ({s.text for s in train} & {s.text for s in held})
    # plain sentences are combinatorially varied: most held-out plain texts are new sentences
    plain = [s for s in held if s.kind == "plain"]
    assert len({s.text for s in plain}) > 0.95 * len(plain)


def _check_arith_line(words):
    a, op, b, is_, c = words
    assert is_ == "is"
    assert C.arith_value(WORDS_OF[a], op, WORDS_OF[b]) == WORDS_OF[c], words
    assert all(0 <= WORDS_OF[x] <= C.MAX_NUMBER for x in (a, b, c))
    assert (a in C.NUMBER_DIGITS) == (c in C.NUMBER_DIGITS)


def test_arithmetic_is_correct(samples):
    n = 0
    for s in samples:
        if s.kind != "arith":
            continue
        w = list(s.words)
        if w[0] == "counting":
            nums = [WORDS_OF[x] for x in w[2:-1]]
            assert nums == list(range(nums[0], nums[0] + C.COUNT_LENGTH))
        else:
            lines = " ".join(w).split(" , then ")
            prev = None
            for line in lines:
                parts = line.rstrip(" .").split()
                _check_arith_line(parts)
                if prev is not None:
                    assert parts[0] == prev  # chains continue from the previous result
                prev = parts[-1]
        assert s.answer == (len(w) - 2, len(w) - 1)
        n += 1
    assert n > 300
    # explicit case: "a plus b is c" for every generated plus fact
    for s in samples:
        if s.kind == "arith" and s.words[1] == "plus" and len(s.words) == 6:
            assert WORDS_OF[s.words[0]] + WORDS_OF[s.words[2]] == WORDS_OF[s.words[4]]


def test_facts_are_correct(samples):
    capital = dict(C.CAPITALS)
    for s in (s for s in samples if s.kind == "fact"):
        w, (a0, a1) = list(s.words), s.answer
        assert 0 <= a0 < a1 <= len(w) - 1 and w[-1] == "."
        if s.template.startswith("fact_capital"):
            country = next(x for x in w if x in capital)
            assert capital[country] in w
        if s.template == "fact_day_after":
            assert C.DAYS.index(w[a0]) == (C.DAYS.index(w[3]) + 1) % 7


def _qa_expected(words, prompt_len):
    """Solve a Q&A item from the world's facts / its context; returns the expected answer words."""
    q = words[:prompt_len]
    if q[0] == "question":
        body = q[2:-3]
        text = " ".join(body)
        if text.startswith("what is the capital of"):
            return [dict(C.CAPITALS)[body[-1]]]
        if text.startswith("what colour is the") and len(body) == 5:
            return [dict(C.COLOUR_FACTS)[body[-1]]]
        if text.startswith("what day comes after"):
            return [C.DAYS[(C.DAYS.index(body[-1]) + 1) % 7]]
        if text.startswith("what is the opposite of"):
            pairs = dict(C.OPPOSITES) | {n: p for p, n in C.OPPOSITES}
            return [pairs[body[-1]]]
        if text.startswith("who is the"):
            return ["my", dict(C.FAMILY_FACTS)[(body[3], body[6])]]
        if text.startswith("what does the"):
            return [dict(C.ANIMAL_FOOD_FACTS)[body[3]]]
        if body[0] == "what" and body[1] == "is":
            a, op, b = body[2:5]
            v = C.arith_value(WORDS_OF[a], op, WORDS_OF[b])
            return [C.NUMBER_DIGITS[v] if a in C.NUMBER_DIGITS else C.NUMBER_WORDS[v]]
        raise AssertionError(f"unknown closed question {text!r}")
    qi = q.index("question")
    ctx, body = q[:qi], q[qi + 2:-3]
    facts = " ".join(ctx).rstrip(" .").split(" and ")
    if body[:3] == ["what", "colour", "is"]:
        animal, name = body[4], body[6]
        for f in facts:
            fw = f.split()
            if fw[0] == name and fw[-1] == animal:
                return [fw[-2]]
    if body[:2] == ["where", "does"]:
        return [ctx[-2]]
    if body[:2] == ["what", "does"]:
        return [ctx[-2]]
    if body[:2] == ["how", "many"]:
        return [ctx[2]]
    raise AssertionError(f"unsolvable context question {' '.join(q)!r}")


def test_qa_answers_are_correct():
    qa = C.generate(1500, seed=3, mix={"qa": 1.0})
    templates = set()
    for s in qa:
        w = list(s.words)
        assert s.prompt_len == s.answer[0] and s.answer[1] == len(w)
        assert w[s.prompt_len - 2:s.prompt_len] == ["answer", ":"]
        assert w[s.answer[0]:s.answer[1]] == _qa_expected(w, s.prompt_len), s.text
        templates.add(s.template)
    assert len(templates) >= 10


def test_decoding_tasks_have_right_answers(tok):
    tasks = C.decoding_tasks(250, seed=0)
    assert {t.kind for t in tasks} == set(C.TASK_KINDS)
    for t in tasks:
        m = t.masked()
        assert [i for i, x in enumerate(m) if x == "[MASK]"] == list(t.answer_positions)
        assert t.score(list(t.words)) == 1.0 and t.score(list(t.answers)) == 1.0
        if t.kind in ("arith", "arith_chain", "chain3"):
            lines = t.text.split(" , then ")
            assert len(lines) == {"arith": 1, "arith_chain": 2, "chain3": 3}[t.kind]
            prev = None
            for line in lines:
                parts = line.rstrip(" .").split()
                _check_arith_line(parts)
                assert prev is None or parts[0] == prev
                prev = parts[-1]
            # every result is hidden, and every repetition of it
            assert len(t.answer_positions) == 2 * len(lines) - 1
        elif t.kind == "count":
            nums = [WORDS_OF[x] for x in t.words[2:-1]]
            assert nums == list(range(nums[0], nums[0] + C.COUNT_LENGTH))
            assert 2 <= len(t.answer_positions) <= 4 and t.answer_positions[-1] == len(t.words) - 2
        elif t.kind == "neutral":
            assert t.meta["open"] and len(t.answer_positions) == 1
            assert t.words[t.answer_positions[0]] in C.TOPICS
            assert " ".join(t.masked("{topic}")).replace(t.words[0], "{name}", 1) in C.NEUTRAL_TEMPLATES
        elif t.kind == "qa":
            assert list(t.answers) == _qa_expected(list(t.words), t.meta["prompt_len"])
        inp, tgt, pos = t.encode(tok)
        assert len(inp) == len(tgt) == len(t.words) + 2
        assert all(inp[p] == tok.mask_token_id and tgt[p] == tok.convert_tokens_to_ids(t.words[p - 1]) for p in pos)
        assert sum(i == tok.mask_token_id for i in inp) == len(pos)
    wrong = tasks[0].masked("x")
    assert tasks[0].score(wrong) == 0.0


# ---------------------------------------------------------------------------------------------- tokenizer

def test_tokenizer_round_trip(samples, tok):
    for s in samples[:500]:
        ids = tok(s.text, add_special_tokens=False)["input_ids"]
        assert tok.convert_ids_to_tokens(ids) == list(s.words)
        assert tok.decode(ids) == s.text
        full = tok(s.text)["input_ids"]
        assert full[0] == tok.bos_token_id and full[-1] == tok.eos_token_id and full[1:-1] == ids
    assert tok("The Capital of FRANCE is Paris.", add_special_tokens=False)["input_ids"] == \
        tok("the capital of france is paris .", add_special_tokens=False)["input_ids"]


def test_special_tokens(tok):
    ids = [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS]
    assert ids == [0, 1, 2, 3, 4]
    got = (tok.pad_token_id, tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.mask_token_id)
    assert got == (0, 1, 2, 3, 4)
    word_ids = set(tok.convert_tokens_to_ids(C.vocabulary()))
    assert tok.mask_token_id not in word_ids and tok.unk_token_id not in word_ids
    assert len(tok) == len(C.vocabulary()) + len(SPECIAL_TOKENS)
    assert tok.convert_ids_to_tokens(tok("[MASK] is blue", add_special_tokens=False)["input_ids"])[0] == "[MASK]"


def test_unknown_words_map_to_unk(tok):
    ids = tok("the zebra is blue", add_special_tokens=False)["input_ids"]
    assert ids[1] == tok.unk_token_id and tok.unk_token_id not in (ids[0], ids[2], ids[3])
    assert tok.convert_tokens_to_ids("xylophone") == tok.unk_token_id


def test_save_and_autotokenizer_load(tmp_path, tok):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    files = save_tokenizer(tok, tmp_path / "tok")
    assert {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"} <= set(files)
    auto = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    fast = PreTrainedTokenizerFast.from_pretrained(str(tmp_path / "tok"))
    for t in (auto, fast, load_tokenizer(tmp_path / "tok")):
        assert t.mask_token_id == tok.mask_token_id and t.mask_token == "[MASK]"
        assert t.pad_token_id == 0 and t.bos_token_id == 2 and t.eos_token_id == 3
        assert t.get_vocab() == tok.get_vocab()
        text = "question : what is 3 plus 4 ? answer : 7"
        assert t(text)["input_ids"] == tok(text)["input_ids"]
    batch = auto(["the sky is blue", "red"], padding=True, return_tensors="pt")
    assert batch["input_ids"].shape == (2, 6) and batch["input_ids"][1, -1].item() == auto.pad_token_id


def test_committed_tokenizer_matches_generator(tok):
    from dlmscope.world import TOKENIZER_DIR

    if not os.path.exists(os.path.join(TOKENIZER_DIR, "tokenizer.json")):
        pytest.skip("assets not built (python -m dlmscope.world.build)")
    assert load_tokenizer(TOKENIZER_DIR).get_vocab() == tok.get_vocab()


def test_concept_id_table(samples, tok):
    names, table = C.concept_id_table(tok)
    assert names == list(C.CONCEPTS) and table.shape == (len(tok),)
    assert (table[:len(SPECIAL_TOKENS)] == -1).all()
    ids = C.pack(samples[:50], tok, 16)
    labels = table[ids]
    for i, l in zip(ids.flatten().tolist(), labels.flatten().tolist()):
        c = C.concept_of(tok.convert_ids_to_tokens(i))
        assert l == (-1 if c is None else names.index(c))
    assert set(table.tolist()) == set(range(len(names))) | {-1}


# ---------------------------------------------------------------------------------------------- packing

def test_pack_shapes(samples, tok):
    part = samples[:200]
    total = sum(len(s.words) + 2 for s in part)
    ids = C.pack(part, tok, 32)
    assert ids.dtype == torch.long and ids.shape == (total // 32, 32)
    assert ids[0, 0].item() == tok.bos_token_id
    assert (ids != tok.pad_token_id).all()
    ids2 = C.pack(part, tok, 32, drop_last=False)
    assert ids2.shape[0] == -(-total // 32) and torch.equal(ids2[:ids.shape[0]], ids)
    # the stream is exactly [BOS] words [EOS] per sample
    flat = ids2.flatten().tolist()
    s0 = [tok.bos_token_id] + tok.convert_tokens_to_ids(list(part[0].words)) + [tok.eos_token_id]
    assert flat[:len(s0)] == s0

    padded = C.pack(part, tok, 48, mode="pad")
    assert padded.shape == (200, 48)
    lengths = (padded != tok.pad_token_id).sum(1)
    assert lengths.tolist() == [len(s.words) + 2 for s in part]
    with pytest.raises(ValueError, match="does not fit"):
        C.pack(part, tok, 5, mode="pad")
    with pytest.raises(ValueError, match="pack mode"):
        C.pack(part, tok, 32, mode="zip")

    qa = C.generate(20, seed=1, mix={"qa": 1.0})
    qids, prompt = C.encode_prompted(qa, tok, 48)
    assert qids.shape == prompt.shape == (20, 48)
    for r, s in enumerate(qa):
        assert prompt[r].sum().item() == 1 + s.prompt_len
        assert qids[r, s.prompt_len].item() == tok.convert_tokens_to_ids(":")
        assert not prompt[r, 1 + s.prompt_len:].any()


# ---------------------------------------------------------------------------------------------- build

def test_build_is_deterministic(tmp_path):
    cfg = B.WorldConfig(n_pretrain=3000, n_instruct=500, n_anneal=500, n_tasks=50, n_sample_lines=5)
    logs = []
    m1 = B.build(str(tmp_path / "a"), cfg, log=logs.append)
    m2 = B.build(str(tmp_path / "b"), cfg, log=logs.append)
    for name in ("world.json", "corpus_sample.txt", "tasks.jsonl", "tokenizer/tokenizer.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert m1 == m2 == json.loads((tmp_path / "a" / "world.json").read_text())
    assert m1["vocab_size"] == len(C.vocabulary()) + 5 and m1["special_tokens"]["[MASK]"] == 4
    assert m1["stats"]["train"]["n_samples"] + m1["stats"]["heldout"]["n_samples"] == 3000
    tasks = [json.loads(line) for line in (tmp_path / "a" / "tasks.jsonl").read_text().splitlines()]
    assert len(tasks) == 50
    for t in tasks:
        task = C.Task(t["kind"], tuple(t["words"]), tuple(t["answer_positions"]))
        assert t["heldout"] == C.task_heldout(task, 0.05, 0)
        assert t["heldout"] == (t["kind"] == "chain3" or C.is_heldout(task.text, 0.05, 0))
    w = B.build_world(cfg)
    held = {s.text for s in w.heldout + w.instruct_heldout}
    assert not held & {s.text for s in w.train + w.instruct_train}


def test_build_with_models_is_byte_identical(tmp_path):
    """Two short builds with (tiny) models write the same bytes: corpus files, world.json and checkpoints."""
    from dlmscope import models
    from dlmscope.world import train_models as TM

    cfg = B.WorldConfig(n_pretrain=TM.MIN_PRETRAIN, n_instruct=400, n_anneal=2000, n_tasks=70, n_sample_lines=2)
    short = dict(mc=TM.ModelConfig(n_layers=2, d_model=32, mlp_hidden=64, n_heads=2),
                 tc=TM.TrainConfig(dlm_steps=4, ar_steps=4, anneal_steps=3, anneal_warmup=1, sft_steps=2, batch=8,
                                   warmup=1, probe_every=2, probe_tasks=20))
    m1 = B.build(str(tmp_path / "a"), cfg, log=lambda *_: None, **short)
    B.build(str(tmp_path / "b"), cfg, log=lambda *_: None, **short)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert {str(f) for f in files} >= {"world.json", "tasks.jsonl", "models/dlm/model.safetensors",
                                       "models/ar/model.safetensors", "models/instruct/model.safetensors",
                                       "models/ar_matched/model.safetensors", "models/placebo/model.safetensors"}
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    q = m1["models"]["quality"]
    assert set(q) == {"dlm", "ar", "instruct", "ar_matched", "placebo"}
    assert set(m1["models"]["qa_accuracy"]) == {"dlm", "instruct", "placebo"}
    # the budget-matched AR twin has seen exactly the DLM's steps, rows and tokens
    tr = m1["models"]["training"]
    assert tr["ar_matched"]["total"] == tr["dlm"]["total"] and tr["ar"]["total"]["steps"] == 4
    assert tr["dlm"]["total"] == {"steps": 11, "rows": 88, "tokens": 88 * 64}
    # the placebo twin took the instruct twin's fine-tuning budget, on base sentences only
    assert tr["placebo"]["total"] == tr["instruct"]["total"] == {"steps": 2, "rows": 128, "tokens": 128 * 32}
    assert tr["placebo"]["init"] == "the DLM" and tr["placebo"]["phases"][0]["data"] == "base sentences only (placebo)"
    # a rebuild that reuses the others' checkpoints and trains only the missing ones writes the same bytes
    shutil.copytree(tmp_path / "a", tmp_path / "c")
    shutil.rmtree(tmp_path / "c" / "models" / "ar_matched")
    shutil.rmtree(tmp_path / "c" / "models" / "placebo")
    B.build(str(tmp_path / "c"), cfg, log=lambda *_: None, reuse=True, **short)
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "c" / f).read_bytes(), f
    assert set(q["dlm"]["heldout"]) >= {"chain3"} and "neutral" not in q["dlm"]["in_distribution"]
    assert models.load(str(tmp_path / "a" / "models" / "dlm")).num_layers == 2


def test_placebo_sft_samples_are_base_sentences_only():
    """The placebo twin's fine-tuning rows: as many as the instruct mix, base sentences that fit, none of the
    Q&A kind (so no prompt rows); the instruct mix itself is unchanged by the option."""
    from dlmscope.world import train_models as TM

    w = B.build_world(B.WorldConfig(n_pretrain=3000, n_instruct=500, n_anneal=100, n_tasks=10))
    mix = TM.sft_samples(w, 0.5, 32, seed=0)
    placebo = TM.sft_samples(w, 0.5, 32, seed=0, placebo=True)
    assert len(placebo) == len(mix) == 2 * len(w.instruct_train)
    train = {id(s) for s in w.train}
    assert all(id(s) in train and s.kind != "qa" and s.prompt_len is None and len(s.words) + 2 <= 32
               for s in placebo)
    base_half = [s for s in w.train if len(s.words) + 2 <= 32][:len(w.instruct_train)]
    assert sorted(map(id, mix)) == sorted(map(id, list(w.instruct_train) + base_half))
    _, prompt = C.encode_prompted(placebo, build_tokenizer(), 32)
    assert prompt.sum(1).eq(1).all()            # only [BOS] is never masked
    with pytest.raises(ValueError, match="placebo"):
        TM.sft_samples(w, 0.999, 32, seed=0, placebo=True)
