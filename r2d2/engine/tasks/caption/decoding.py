"""Caption decoding: greedy, beam search and nucleus sampling over an incremental LM.

The search code knows nothing about the captioner. It drives an *LM state* with two methods
(:class:`r2d2.engine.model.captioner.DecodeState`, or a stub in the tests):

    state.step(ids [N, T]) -> logits [N, V]     the next-token logits after feeding ids
    state.reorder(index [N'])                   keep / repeat rows of the cache

and returns, per image, the generated token ids without the closing EOS. Hand-written (a few
dozen lines) because ``transformers``' ``generate`` needs a ``PreTrainedModel``; the rules follow
its documented behaviour:

* lengths count generated tokens, the closing EOS included (``max_length``); EOS is banned until
  ``min_length`` caption tokens exist; tokens that would repeat an n-gram of the caption
  (``no_repeat_ngram``) are banned; special tokens other than EOS are never generated;
* beam search keeps ``beam_size`` live beams per image; a beam that ends (EOS among the top
  ``beam_size`` candidates) is scored ``sum log p / length ** length_penalty``; an image is done
  when it has ``beam_size`` finished captions and no live beam can still beat the worst of them
  (its sum divided by the current length's penalty, as ``transformers`` does); at ``max_length``
  the live beams are finished as they are; the best-scoring caption wins;
* nucleus sampling keeps the smallest set of tokens whose probability reaches ``top_p`` (after
  ``temperature``) and samples with a ``torch.Generator`` seeded from ``seed``: the same seed,
  the same captions.
"""

from __future__ import annotations

import dataclasses

import torch

NEG_INF = float("-inf")


def _ban(logits, gens, eos_id, banned, min_length, no_repeat_ngram) -> torch.Tensor:
    """``logits [N, V]`` with the banned tokens of each row at -inf (a new tensor)."""
    logits = logits.clone()
    if banned:
        logits[:, list(banned)] = NEG_INF
    n = no_repeat_ngram
    for r, gen in enumerate(gens):
        if len(gen) < min_length:
            logits[r, eos_id] = NEG_INF
        if n and len(gen) >= n - 1:
            tail = tuple(gen[len(gen) - n + 1 :]) if n > 1 else ()
            seen = [
                gen[i + n - 1] for i in range(len(gen) - n + 1) if tuple(gen[i : i + n - 1]) == tail
            ]
            if seen:
                logits[r, seen] = NEG_INF
    # a row left without any token (everything banned) can only end
    stuck = torch.isneginf(logits).all(-1)
    if bool(stuck.any()):
        logits[stuck, eos_id] = 0.0
    return logits


def sample_or_greedy(
    state,
    prefix: torch.Tensor,
    eos_id: int,
    max_length: int,
    min_length: int = 0,
    no_repeat_ngram: int = 0,
    banned: tuple = (),
    top_p: float | None = None,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> list[list[int]]:
    """Greedy decoding (``top_p`` None) or nucleus sampling of ``prefix [N, P]``'s rows."""
    N = prefix.shape[0]
    gens: list[list[int]] = [[] for _ in range(N)]
    done = [False] * N
    logits = state.step(prefix)
    for _ in range(max_length):
        logits = _ban(logits, gens, eos_id, banned, min_length, no_repeat_ngram)
        if top_p is None:
            nxt = logits.argmax(-1)
        else:
            probs = (logits / temperature).softmax(-1)
            sp, si = probs.sort(-1, descending=True)
            keep = sp.cumsum(-1) - sp < top_p  # the top token always stays
            sp = sp * keep
            pick = torch.multinomial(sp / sp.sum(-1, keepdim=True), 1, generator=generator)
            nxt = si.gather(-1, pick)[:, 0]
        toks = nxt.tolist()
        for r, t in enumerate(toks):
            if done[r]:
                continue
            if t == eos_id:
                done[r] = True
            else:
                gens[r].append(t)
        if all(done):
            break
        # finished rows keep feeding EOS: cheap, and the batch stays one tensor
        feed = torch.tensor([eos_id if d else t for d, t in zip(done, toks)], device=prefix.device)
        logits = state.step(feed[:, None])
    return gens


def beam_search(
    state,
    prefix: torch.Tensor,
    eos_id: int,
    beam_size: int,
    max_length: int,
    min_length: int = 0,
    no_repeat_ngram: int = 0,
    banned: tuple = (),
    length_penalty: float = 1.0,
) -> list[list[int]]:
    """Beam search for each row of ``prefix [B, P]``; ``state`` holds ``B * beam_size`` rows
    (image ``b``'s beams are rows ``b * beam_size ...``)."""
    B, K, dev = prefix.shape[0], beam_size, prefix.device
    logp = state.step(prefix.repeat_interleave(K, 0)).log_softmax(-1)  # [B*K, V]
    # only beam 0 of each image is live at the start (all K rows hold the same prefix)
    scores = torch.full((B, K), NEG_INF, device=dev)
    scores[:, 0] = 0.0
    gens: list[list[int]] = [[] for _ in range(B * K)]
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(B)]
    done = [False] * B

    def norm(total: float, length: int) -> float:
        return total / (max(length, 1) ** length_penalty)

    for step in range(max_length):
        logp = _ban(logp, gens, eos_id, banned, min_length, no_repeat_ngram)
        V = logp.shape[-1]
        cand = (scores.reshape(-1, 1) + logp).reshape(B, K * V)
        top, idx = (t.tolist() for t in cand.topk(min(2 * K, K * V), dim=-1))
        last = step == max_length - 1
        rows: list[tuple[float, int, int]] = []  # (score, source row, token) of the next beams
        for b in range(B):
            live: list[tuple[float, int, int]] = []
            for rank, (s, j) in enumerate(zip(top[b], idx[b])):
                if done[b] or s == NEG_INF or len(live) == K:
                    break
                r, t = b * K + j // V, j % V
                if t != eos_id:
                    live.append((s, r, t))
                elif rank < K:  # an ending among the best K candidates
                    finished[b].append((norm(s, len(gens[r]) + 1), gens[r]))
            if not done[b]:
                if last or not live:  # out of length: the live beams end as they are
                    finished[b] += [(norm(s, step + 1), [*gens[r], t]) for s, r, t in live]
                    done[b] = True
                elif len(finished[b]) >= K:
                    worst = sorted(f[0] for f in finished[b])[-K]
                    done[b] = worst >= norm(live[0][0], step + 1)
            # dead rows (a finished image, too few live candidates) keep feeding EOS at -inf
            live += [(NEG_INF, b * K, eos_id)] * (K - len(live))
            rows += live
        if all(done):
            break
        scores = torch.tensor([s for s, _, _ in rows], device=dev).reshape(B, K)
        gens = [[*gens[r], t] for _, r, t in rows]
        state.reorder(torch.tensor([r for _, r, _ in rows], device=dev))
        logp = state.step(torch.tensor([t for _, _, t in rows], device=dev)[:, None]).log_softmax(
            -1
        )
    out = []
    for b in range(B):
        best = max(finished[b], key=lambda f: f[0]) if finished[b] else (0.0, [])
        out.append(best[1])
    return out


def banned_ids(tok) -> tuple:
    """Special tokens a caption never contains ([PAD], [UNK], [CLS], [MASK]); [SEP] is EOS."""
    return tuple(i for i in getattr(tok, "special_ids", ()) if i != tok.sep_id)


@torch.no_grad()
def decode_captions(model, images: torch.Tensor, options=None, **overrides) -> list[str]:
    """Captions of ``images [B, 3, H, W]`` by ``model`` (an R2D2Captioner with a tokenizer):
    the prefix [CLS] + the model's prompt, decoded with ``options`` (a CaptionConfig; default
    the model's ``caption``) changed by ``overrides``, the prompt stripped."""
    opts = options if options is not None else model.caption
    if overrides:
        opts = dataclasses.replace(opts, **overrides)
    return [model.detokenize(g) for g in decode_ids(model, images, opts)]


@torch.no_grad()
def decode_ids(model, images: torch.Tensor, opts) -> list[list[int]]:
    """Generated token ids per image (no prompt, no EOS); see :func:`decode_captions`."""
    from r2d2.engine.model.captioner import DecodeState

    was = model.training
    model.eval()
    try:
        tok = model._require_tokenizer()
        prefix_ids = model.prompt_ids()
        max_pos = model.config.text.max_positions
        max_length = min(opts.max_length, max_pos - len(prefix_ids))
        if max_length < 1:
            raise ValueError(
                f"the prompt takes {len(prefix_ids)} of text.max_positions={max_pos} positions"
            )
        images = images.to(model.device)
        B = images.shape[0]
        prefix = torch.tensor([prefix_ids] * B, device=model.device)
        common = dict(
            eos_id=tok.sep_id,
            max_length=max_length,
            min_length=min(opts.min_length, max_length - 1),
            no_repeat_ngram=opts.no_repeat_ngram,
            banned=banned_ids(tok),
        )
        image = model.image_tokens(images)
        if opts.strategy == "beam" and opts.beam_size > 1:
            state = DecodeState(model, image.repeat_interleave(opts.beam_size, 0))
            return beam_search(
                state,
                prefix,
                beam_size=opts.beam_size,
                length_penalty=opts.length_penalty,
                **common,
            )
        state = DecodeState(model, image)
        gen = None
        if opts.strategy == "sample":
            gen = torch.Generator(device=model.device)
            gen.manual_seed(opts.seed)
        return sample_or_greedy(
            state,
            prefix,
            top_p=opts.top_p if opts.strategy == "sample" else None,
            temperature=opts.temperature,
            generator=gen,
            **common,
        )
    finally:
        model.train(was)
