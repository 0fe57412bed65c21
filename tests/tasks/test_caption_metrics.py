"""r2d2.engine.tasks.caption.metrics: hand-computed cases, and CIDEr-D against a second, tiny
implementation of its formula written here from the paper's definition (the oracle)."""

import math
import os
import random
import shutil
import subprocess
import sys
from collections import Counter

import pytest

from r2d2.engine.tasks.caption import metrics as cm
from r2d2.engine.tasks.caption.metrics import (
    METRICS,
    MetricUnavailable,
    format_table,
    score_captions,
    tokenize_caption,
)


# ------------------------------------------------------------------------------ the oracle
def cider_d_oracle(refs: dict, hyps: dict, n: int = 4, sigma: float = 6.0) -> float:
    """CIDEr-D (Vedantam et al. 2015, the -D variant of the coco-caption code), x100.

    ``refs``: id -> list of token lists; ``hyps``: id -> token list. Per n-gram order k, tf-idf
    vectors g_k with idf = log(N_images / max(1, df)), df counted over each image's references;
    CIDEr-D_k = 10/m * sum_refs [sum_w min(g_hyp, g_ref) g_ref] / (|g_hyp| |g_ref|)
                * exp(-(len_hyp - len_ref)^2 / (2 sigma^2)); the image's score is the mean over k;
    the corpus score the mean over images."""

    def grams(tokens, k):
        return Counter(tuple(tokens[i : i + k]) for i in range(len(tokens) - k + 1))

    n_images = len(refs)
    df = Counter()
    for rs in refs.values():
        df.update({g for r in rs for k in range(1, n + 1) for g in grams(r, k)})

    def tfidf(tokens, k):
        return {
            g: c * (math.log(n_images) - math.log(max(1, df[g])))
            for g, c in grams(tokens, k).items()
        }

    def norm(v):
        return math.sqrt(sum(x * x for x in v.values()))

    total = 0.0
    for key, rs in refs.items():
        hyp = hyps[key]
        per_k = []
        for k in range(1, n + 1):
            gh = tfidf(hyp, k)
            acc = 0.0
            for r in rs:
                gr = tfidf(r, k)
                dot = sum(min(v, gr.get(g, 0.0)) * gr.get(g, 0.0) for g, v in gh.items())
                den = norm(gh) * norm(gr)
                cos = dot / den if den else 0.0
                acc += cos * math.exp(-((len(hyp) - len(r)) ** 2) / (2 * sigma**2))
            per_k.append(acc / len(rs))
        total += 10.0 * sum(per_k) / n
    return 100.0 * total / n_images


def _random_corpus(rng: random.Random, images: int, vocab: int, perfect: bool):
    words = [f"w{i}" for i in range(vocab)]

    def sent():
        return [rng.choice(words) for _ in range(rng.randint(1, 9))]

    refs = {f"img{i}": [sent() for _ in range(rng.randint(1, 5))] for i in range(images)}
    hyps = {k: (list(rng.choice(rs)) if perfect else sent()) for k, rs in refs.items()}
    return refs, hyps


def _as_text(refs, hyps):
    return {k: [" ".join(r) for r in rs] for k, rs in refs.items()}, {
        k: " ".join(h) for k, h in hyps.items()
    }


# ------------------------------------------------------------------------------ CIDEr-D
def test_cider_d_perfect_match_small_corpus_matches_oracle():
    # 3 images; hypothesis = one of the references; the other references differ in length,
    # so the Gaussian length penalty and the clipping both matter
    refs = {
        "a": [["一个", "男人", "在", "街上", "走路"], ["男人", "走路"]],
        "b": [["两只", "狗", "在", "草地", "上", "奔跑", "着", "玩"], ["狗", "在", "跑"]],
        "c": [["一", "个", "女人", "在", "做饭"]],
    }
    hyps = {"a": refs["a"][0], "b": refs["b"][0], "c": refs["c"][0]}
    r, h = _as_text(refs, hyps)
    got = score_captions(r, h, tokenize="none")["CIDEr-D"]
    assert got == pytest.approx(cider_d_oracle(refs, hyps), rel=1e-9)
    assert got > 0


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("perfect", [True, False])
def test_cider_d_random_corpora_match_oracle(seed, perfect):
    rng = random.Random(seed * 7919 + perfect)
    refs, hyps = _random_corpus(
        rng, images=rng.randint(2, 12), vocab=rng.randint(4, 15), perfect=perfect
    )
    r, h = _as_text(refs, hyps)
    assert score_captions(r, h, tokenize="none")["CIDEr-D"] == pytest.approx(
        cider_d_oracle(refs, hyps), rel=1e-9, abs=1e-9
    )


def test_cider_d_single_image_is_zero():
    # idf = log(1) - log(df=1) = 0 for every n-gram: documented, not a bug of ours
    s = score_captions({"a": ["猫 坐 在 垫子 上"]}, {"a": "猫 坐 在 垫子 上"}, tokenize="none")
    assert s["CIDEr-D"] == 0.0
    assert s["BLEU-4"] == pytest.approx(100.0)


# ------------------------------------------------------------------------------ BLEU / ROUGE-L
def test_identical_scores_full_marks():
    refs = {
        "1": ["一个 男人 在 街上 慢慢 走路", "男人 走 在 路上"],
        "2": ["两只 小狗 在 草地 上 奔跑", "草地 上 有 狗"],
        "3": ["一个 女人 在 厨房 里 做饭"],
    }
    hyps = {k: v[0] for k, v in refs.items()}
    s = score_captions(refs, hyps, tokenize="none")
    assert list(s) == list(METRICS)
    for n in range(1, 5):
        assert s[f"BLEU-{n}"] == pytest.approx(100.0, rel=1e-6)
    assert s["ROUGE-L"] == pytest.approx(100.0)
    assert s["CIDEr-D"] > 0


def test_disjoint_scores_zero():
    refs = {"1": ["一个 男人 在 街上 走路"], "2": ["两只 狗 在 草地 上 奔跑"]}
    hyps = {"1": "蓝色 的 天空 白云", "2": "汽车 停 路边 很久 了"}
    s = score_captions(refs, hyps, tokenize="none")
    for name in METRICS:
        assert s[name] == pytest.approx(0.0, abs=1e-9), name


def test_bleu1_hand_computed_clipping_and_brevity():
    # hypothesis 猫 x3 + 坐: 猫 is clipped at its reference count 2 -> 3 matches of 4 guesses;
    # c = 4 < r = 6 -> brevity penalty exp(1 - 6/4)
    refs = {"x": ["猫 坐 在 垫子 上 猫"]}
    hyps = {"x": "猫 猫 猫 坐"}
    s = score_captions(refs, hyps, tokenize="none")
    assert s["BLEU-1"] == pytest.approx(100 * 0.75 * math.exp(1 - 6 / 4), rel=1e-6)
    # bigrams: (猫 猫) x2 -> 0 matches (not in the reference), (猫 坐) -> 1 of 3
    assert s["BLEU-2"] == pytest.approx(100 * math.sqrt(0.75 * (1 / 3)) * math.exp(-0.5), rel=1e-6)


def test_bleu_brevity_uses_closest_reference_length():
    # references of lengths 3 and 8; a 3-token exact match has no brevity penalty
    refs = {"x": ["猫 在 睡", "一 只 很 胖 的 猫 在 睡"]}
    s = score_captions(refs, {"x": "猫 在 睡"}, tokenize="none")
    assert s["BLEU-1"] == pytest.approx(100.0, rel=1e-6)


def test_rouge_l_hand_computed():
    # LCS(hyp, ref) = 男人 走路 (2); P = 2/3, R = 2/4; F_beta with beta = 1.2
    refs = {"x": ["一个 男人 在 走路"]}
    s = score_captions(refs, {"x": "男人 快 走路"}, tokenize="none")
    p, r, b = 2 / 3, 2 / 4, 1.2
    assert s["ROUGE-L"] == pytest.approx(100 * (1 + b * b) * p * r / (r + b * b * p))


def test_empty_hypothesis_scores_zero():
    refs = {"1": ["一个 男人 在 街上 走路"], "2": ["两只 狗 在 草地 上 奔跑"]}
    s = score_captions(refs, {"1": "", "2": ""}, tokenize="jieba")
    for name in METRICS:
        assert s[name] == pytest.approx(0.0, abs=1e-9), name


def test_order_of_ids_does_not_matter():
    rng = random.Random(3)
    refs, hyps = _random_corpus(rng, images=9, vocab=8, perfect=False)
    r, h = _as_text(refs, hyps)
    keys = list(r)
    rng.shuffle(keys)
    r2 = {k: r[k] for k in keys}
    h2 = {k: h[k] for k in reversed(keys)}
    assert score_captions(r, h, tokenize="none") == score_captions(r2, h2, tokenize="none")


# ------------------------------------------------------------------------------ tokenisation
def test_jieba_and_char_tokenise_differently():
    text = "一个穿着红色T恤的男人在街上走路。"
    jb = tokenize_caption(text, "jieba")
    ch = tokenize_caption(text, "char")
    assert jb != ch
    assert ch == [
        "一",
        "个",
        "穿",
        "着",
        "红",
        "色",
        "t",
        "恤",
        "的",
        "男",
        "人",
        "在",
        "街",
        "上",
        "走",
        "路",
    ]
    assert "".join(jb) == "".join(ch)  # same characters, punctuation dropped, lower-cased
    assert any(len(t) > 1 for t in jb)  # words, not characters
    refs = {"1": ["一个男人在街上走路"], "2": ["两只狗在草地上奔跑"]}
    hyps = {"1": "男人在路上走", "2": "狗在草地上"}
    assert (
        score_captions(refs, hyps, "jieba")["BLEU-1"]
        != score_captions(refs, hyps, "char")["BLEU-1"]
    )


def test_char_mode_rules():
    # full-width letters/digits -> ASCII (NFKC), Latin runs stay one token, punctuation and
    # whitespace dropped, other symbols one token each
    assert tokenize_caption("ＮＢＡ球员 3个人，在打球!", "char") == [
        "nba",
        "球",
        "员",
        "3",
        "个",
        "人",
        "在",
        "打",
        "球",
    ]
    assert tokenize_caption("1+1 等于 2♥", "char") == ["1", "+", "1", "等", "于", "2", "♥"]


def test_none_mode_keeps_tokens_as_given():
    assert tokenize_caption("  A  b，  c ", "none") == ["A", "b，", "c"]


def test_jieba_tokens_have_no_whitespace_or_punctuation():
    toks = tokenize_caption(" 一个 男人，在\n街上 走路！ ", "jieba")
    assert toks and all(t.strip() == t and t for t in toks)
    assert "，" not in toks and "！" not in toks


def test_jieba_loads_quietly_with_its_cache_in_ours(tmp_path):
    # a fresh process: jieba's first load prints "Building prefix dict ..." unless silenced,
    # and writes its cache into $XDG_CACHE_HOME/r2d2/jieba instead of the system temp folder
    code = (
        "from r2d2.engine.tasks.caption.metrics import tokenize_caption as t\n"
        "a = t('一个男人在街上走路', 'jieba'); b = t('一个男人在街上走路', 'jieba')\n"
        "assert a == b, (a, b)\n"
    )
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path))
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == "" and out.stderr == ""
    assert (tmp_path / "r2d2" / "jieba" / "jieba.cache").is_file()


# ------------------------------------------------------------------------------ validation
def test_mismatched_ids_named():
    with pytest.raises(ValueError, match=r"without references: 'z'.*without a hypothesis: 'b'"):
        score_captions({"a": ["猫"], "b": ["狗"]}, {"a": "猫", "z": "狗"})


@pytest.mark.parametrize(
    "refs, match",
    [
        ({"a": []}, "non-empty list"),
        ({"a": "一只猫"}, "non-empty list"),
        ({"a": ["一只猫", "  "]}, "reference 1 of id 'a'"),
        ({"a": ["一只猫", 3]}, "reference 1 of id 'a'"),
    ],
)
def test_bad_references_refused(refs, match):
    with pytest.raises(ValueError, match=match):
        score_captions(refs, {"a": "一只猫"})


def test_bad_hypotheses_and_options_refused():
    with pytest.raises(ValueError, match="hypothesis of id 'a' must be a string"):
        score_captions({"a": ["一只猫"]}, {"a": ["一只猫"]})
    with pytest.raises(ValueError, match="no hypotheses"):
        score_captions({}, {})
    with pytest.raises(ValueError, match="tokenize='words'"):
        score_captions({"a": ["一只猫"]}, {"a": "一只猫"}, tokenize="words")


def test_punctuation_only_references_do_not_crash():
    s = score_captions({"a": ["。。"], "b": ["！"]}, {"a": "猫", "b": ""}, tokenize="char")
    assert s["CIDEr-D"] == 0.0 and s["BLEU-1"] == pytest.approx(0.0, abs=1e-9)


# ------------------------------------------------------------------------------ METEOR, table
def test_meteor_without_java_is_a_clear_usage_error(monkeypatch):
    monkeypatch.setattr(cm.shutil, "which", lambda name: None)
    with pytest.raises(MetricUnavailable, match="java"):
        score_captions({"a": ["一只猫"], "b": ["狗"]}, {"a": "一只猫", "b": "狗"}, meteor=True)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("java") is None, reason="METEOR needs java")
def test_meteor_identical_and_disjoint():
    refs = {"1": ["一个 男人 在 街上 走路"], "2": ["两只 狗 在 草地 上 奔跑"]}
    same = score_captions(refs, {k: v[0] for k, v in refs.items()}, "none", meteor=True)
    assert list(same) == ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "METEOR", "CIDEr-D"]
    assert same["METEOR"] == pytest.approx(100.0, abs=1.0)  # 1 chunk: tiny fragmentation penalty
    other = score_captions(refs, {"1": "蓝色 天空", "2": "汽车 停 着"}, "none", meteor=True)
    assert other["METEOR"] == pytest.approx(0.0, abs=1e-9)


def test_format_table_one_row():
    table = format_table({"BLEU-4": 39.6543, "CIDEr-D": 129.81})
    head, row = table.splitlines()
    assert head.split() == ["BLEU-4", "CIDEr-D"]
    assert row.split() == ["39.7", "129.8"]
    assert len(head) == len(row)
