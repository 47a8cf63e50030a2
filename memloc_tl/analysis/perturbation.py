"""Which prefix tokens does recall depend on? Prefix-token perturbation (paper section 4, Fig. 3).

Each prefix token of each paragraph is replaced, one at a time, by random vocabulary tokens
(seeded; never the original token). For every variant the exact-match length and the NLL of
the *original* continuation are measured with the teacher-forced scan — exact, because EM until
the first mismatch needs no generation (see :mod:`memloc_tl.memorization`) — in large batches
instead of one 50-step generation per variant.

The paper reports a mean EM drop per perturbed token of 12.19 for memorized and 33.12 for
non-memorized paragraphs of GPT-Neo 125M, and that later positions matter more.

The perturbed memorized paragraph (the paper's PMP) of each paragraph is its prefix perturbed
at the position with the largest EM drop, followed by the model's own greedy continuation; only
that step generates text.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, Literal

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from memloc_tl.core.backend import HookedModel, shares_prefix_cache
from memloc_tl.core.forward import (
    PrefixKV,
    exact_match_length,
    forward_rows,
    greedy_continuations,
    on_cpu,
    score_continuations,
)
from memloc_tl.core.paragraphs import Paragraphs, check_set
from memloc_tl.core.rendering import render
from memloc_tl.core.results import Drawable, TokenScores
from memloc_tl.core.unembedding import shared_unembedding
from memloc_tl.core.validation import (
    check_bool,
    check_choice,
    check_config,
    check_positive_int,
    check_seed,
)


@dataclass(frozen=True)
class PrefixPerturbation(Drawable):
    """EM and NLL of each paragraph's continuation with one prefix token replaced.

    Attributes:
        paragraphs: the original paragraphs.
        baseline_em: EM of each unperturbed paragraph.
        baseline_nll: mean continuation NLL of each unperturbed paragraph.
        replacements: the replacement token of each variant ``[paragraph, position, sample]``;
            -1 at positions that were not perturbed.
        em: EM of the original continuation for each variant (-1 where not perturbed).
        nll: mean NLL of the original continuation for each variant (NaN where not perturbed).
        perturbed: the PMPs (``None`` unless built): each paragraph's prefix perturbed where
            the EM dropped most, followed by the model's greedy continuation; meta
            ``position``, ``original_token``, ``replacement_token``, ``em_drop``.
        seed: the seed of the random replacements.
    """

    paragraphs: Paragraphs
    baseline_em: Int[Tensor, " n_paragraphs"]
    baseline_nll: Float[Tensor, " n_paragraphs"]
    replacements: Int[Tensor, "n_paragraphs prefix_pos sample"]
    em: Int[Tensor, "n_paragraphs prefix_pos sample"]
    nll: Float[Tensor, "n_paragraphs prefix_pos sample"]
    perturbed: Paragraphs | None
    seed: int

    def __post_init__(self) -> None:
        n, p = len(self.paragraphs), self.paragraphs.prefix_len
        for name in ("replacements", "em", "nll"):
            shape = tuple(getattr(self, name).shape)
            if shape[:2] != (n, p) or len(shape) != 3:
                raise ValueError(f"{name} must have shape [{n}, {p}, sample], got {shape}")

    @property
    def perturbed_positions(self) -> Tensor:
        """Boolean ``[prefix_pos]``: which positions were perturbed."""
        return (self.replacements[0] >= 0).any(-1)

    @property
    def em_drop(self) -> TokenScores:
        """Mean EM drop over samples, ``[paragraph, prefix_pos]`` (NaN where not perturbed)."""
        drop = (self.baseline_em[:, None, None] - self.em).float()
        drop = drop.where(self.em >= 0, torch.nan).mean(-1)
        return TokenScores("EM drop when the token is perturbed", drop, self.paragraphs)

    @property
    def nll_change(self) -> TokenScores:
        """Mean change of the continuation NLL over samples, ``[paragraph, prefix_pos]``."""
        change = (self.nll - self.baseline_nll[:, None, None]).mean(-1)
        return TokenScores(
            "continuation NLL change when the token is perturbed", change, self.paragraphs
        )

    def mean_drop_per_position(self) -> Float[Tensor, " prefix_pos"]:
        """EM drop per prefix position, averaged over paragraphs (Fig. 3 bottom)."""
        return self.em_drop.scores.mean(0)

    def mean_drop_per_paragraph(self) -> Float[Tensor, " n_paragraphs"]:
        """EM drop per paragraph, averaged over the perturbed positions."""
        return self.em_drop.scores.nanmean(-1)

    def mean_drop_per_token(self) -> float:
        """The paper's "mean EM drop per perturbed token" (GPT-Neo 125M: MP 12.19, NMP 33.12)."""
        return float(self.em_drop.scores.nanmean())

    def top(self, k: int = 5) -> list[tuple[str, int, float]]:
        """The ``k`` (paragraph id, position, EM drop) whose perturbation hurts recall most."""
        return self.em_drop.top(k)

    def to_frame(self) -> pd.DataFrame:
        """Long format: one row per paragraph, position and sample."""
        n, p, s = self.em.shape
        frame = pd.DataFrame(
            {
                "id": [i for i in self.paragraphs.ids for _ in range(p * s)],
                "position": [pos for _ in range(n) for pos in range(p) for _ in range(s)],
                "sample": list(range(s)) * (n * p),
                "original_token": self.paragraphs.prefix[:, :, None]
                .expand(n, p, s)
                .flatten()
                .tolist(),
                "replacement_token": self.replacements.flatten().tolist(),
                "baseline_em": self.baseline_em[:, None, None].expand(n, p, s).flatten().tolist(),
                "em": self.em.flatten().tolist(),
                "nll": self.nll.flatten().tolist(),
            }
        )
        kept = frame.loc[frame["replacement_token"] >= 0]
        return pd.DataFrame(kept).reset_index(drop=True)

    def figure(self, name: str = "paragraphs") -> Any:
        """Mean EM drop per prefix position (:func:`memloc_tl.viz.em_drop_figure`)."""
        return render(self, name=name)

    def __repr__(self) -> str:
        return (
            f"PrefixPerturbation(n={len(self.paragraphs)}, samples={self.em.shape[-1]}, "
            f"mean EM drop per token={self.mean_drop_per_token():.2f}, "
            f"pmp={'built' if self.perturbed is not None else 'not built'})"
        )


def random_replacements(
    prefix: Int[Tensor, "n prefix_pos"],
    d_vocab: int,
    n_samples: int,
    generator: torch.Generator,
) -> Int[Tensor, "n prefix_pos sample"]:
    """Uniform random tokens that differ from the original at each position."""
    offsets = torch.randint(1, d_vocab, (*prefix.shape, n_samples), generator=generator)
    return (prefix[..., None] + offsets) % d_vocab


EmAgainst = Literal["true", "greedy"]
PMPChoice = Literal["min_em", "max_nll"]


@dataclass(frozen=True)
class PerturbConfig:
    """The settings of :func:`perturb_prefixes` (each checked when the config is made).

    Attributes:
        n_samples: random replacements per position.
        include_first: also perturb position 0 (the reference code never did).
        em_against: the continuation EM is measured against: ``"true"`` (the paragraph's own)
            or ``"greedy"`` (the model's greedy continuation of the unperturbed prefix, so the
            baseline EM is always full; the paper's choice for non-memorized paragraphs).
            ``result.paragraphs`` holds the continuation used.
        seed: seed of the replacements.
        pmp_choice: which variant becomes each paragraph's PMP: ``"min_em"`` (the paper's: the
            lowest EM, earliest position and sample on ties) or ``"max_nll"`` (the largest rise
            of the original continuation's NLL, which separates variants that all reach EM 0).
        pmp_exclude_last: never choose the last ``k`` prefix positions for the PMP. Replacing
            the token right before the continuation often breaks recall trivially (the paper's
            PMPs were at positions 2-49, median 44); ``k > 0`` asks for a PMP whose change lies
            further back. The scores of every position are kept either way.
        shared_prefix: reuse the unperturbed paragraph's keys and values before the perturbed
            position (:class:`memloc_tl.core.forward.PrefixKV`) instead of recomputing them;
            the same numbers up to float rounding, about a quarter less compute for 50-token
            prefixes. Default (None): on the CPU, where it was measured faster (1.67x on GPT-Neo
            125M's layout, HookedTransformer), on a HookedTransformer and on a TransformerBridge
            whose forward fills Hugging Face's cache (GPT-Neo's does; where TransformerLens's
            own attention runs, as for GPT-2 and Llama under TransformerLens 4, it recomputes);
            on a GPU recomputing was as fast or faster (0.94x there on an H100). ``True`` on a
            bridge that cannot is an error.
        batch_size: variants per forward pass; on a CPU at most as many as a scan's forward
            takes (:func:`memloc_tl.core.forward.forward_rows`: 3,200 tokens, and 32 MiB for
            the largest activation, 27 windows of 100 on GPT-Neo 125M).
    """

    n_samples: int = 1
    include_first: bool = False
    em_against: EmAgainst = "true"
    seed: int = 0
    pmp_choice: PMPChoice = "min_em"
    pmp_exclude_last: int = 0
    shared_prefix: bool | None = None
    batch_size: int = 32

    def __post_init__(self) -> None:
        check_positive_int(self.n_samples, "n_samples")
        check_bool(self.include_first, "include_first")
        if self.shared_prefix is not None and not isinstance(self.shared_prefix, bool):
            raise TypeError(
                f"shared_prefix must be True, False or None, got {self.shared_prefix!r}"
            )
        check_choice(self.em_against, "em_against", typing.get_args(EmAgainst))
        check_seed(self.seed)
        check_choice(self.pmp_choice, "pmp_choice", typing.get_args(PMPChoice))
        if isinstance(self.pmp_exclude_last, bool) or not isinstance(self.pmp_exclude_last, int):
            raise TypeError(f"pmp_exclude_last must be an int, got {self.pmp_exclude_last!r}")
        if self.pmp_exclude_last < 0:
            raise ValueError(f"pmp_exclude_last must be >= 0, got {self.pmp_exclude_last}")
        check_positive_int(self.batch_size, "batch_size")


def perturb_prefixes(
    model: HookedModel,
    paragraphs: Paragraphs,
    *,
    config: PerturbConfig | None = None,
    build_perturbed: bool = True,
    progress: bool = True,
) -> PrefixPerturbation:
    """Replace each prefix token in turn and measure how recall of the continuation changes.

    Args:
        model: the model (not changed).
        paragraphs: the paragraphs.
        config: the settings (default :class:`PerturbConfig`: one replacement per position,
            EM against the paragraph's own continuation, seed 0).
        build_perturbed: also build each paragraph's PMP (needs one greedy generation each).
        progress: show a progress bar.

    Returns:
        The result; ``result.mean_drop_per_token()`` is the paper's headline number.
    """
    config = check_config(config, PerturbConfig)
    check_set(model, paragraphs, "paragraphs")
    n_samples, seed = config.n_samples, config.seed
    # variants per forward: on a CPU within the token and activation budgets of a scan
    batch_size = forward_rows(model, config.batch_size, paragraphs.seq_len)
    shared_prefix = config.shared_prefix
    if shared_prefix is None:
        shared_prefix = shares_prefix_cache(model) and on_cpu(model)
    first = 0 if config.include_first else 1  # the first perturbed position
    if not config.pmp_exclude_last < paragraphs.prefix_len - first:
        raise ValueError(
            f"pmp_exclude_last must be in 0..{paragraphs.prefix_len - first - 1} (some "
            f"perturbed position must remain), got {config.pmp_exclude_last}"
        )
    if config.em_against == "greedy":
        paragraphs = paragraphs.with_continuation(
            greedy_continuations(model, paragraphs.prefix, paragraphs.continuation_len)
        )
    n, p, s = len(paragraphs), paragraphs.prefix_len, n_samples
    tokens = paragraphs.tokens
    generator = torch.Generator().manual_seed(seed)
    replacements = random_replacements(paragraphs.prefix, model.cfg.d_vocab, s, generator)
    replacements[:, :first] = -1
    positions = torch.arange(first, p)

    # Every variant (paragraph, position, sample), ordered by position so that a batch shares
    # its paragraphs' keys and values up to its first perturbed position.
    cols, rows, samples = torch.meshgrid(positions, torch.arange(n), torch.arange(s), indexing="ij")
    rows, cols, samples = rows.flatten(), cols.flatten(), samples.flatten()
    em = torch.full((n, p, s), -1, dtype=torch.long)
    nll = torch.full((n, p, s), torch.nan)
    # Keys and values of every unperturbed paragraph, chunk by chunk to bound memory.
    chunk = max(batch_size, 1)
    # one block for the baseline and every variant: one copy of the unembedding for all
    with torch.no_grad(), shared_unembedding():
        base_match, base_nll = score_continuations(model, tokens, p)
        baseline_em = exact_match_length(base_match).cpu()
        baseline_nll = base_nll.mean(-1).cpu()
        bar = tqdm(total=len(rows), desc="perturbing", disable=not progress)
        for first_row in range(0, n, chunk):
            in_chunk = (rows >= first_row) & (rows < first_row + chunk)
            r_chunk, c_chunk, k_chunk = rows[in_chunk], cols[in_chunk], samples[in_chunk]
            chunk_tokens = tokens[first_row : first_row + chunk]
            shared = None
            if shared_prefix:  # asked for: must work; by default: where the model can
                build = PrefixKV.build if config.shared_prefix else PrefixKV.try_build
                shared = build(model, chunk_tokens)
                shared_prefix = shared is not None
            for start in range(0, len(r_chunk), batch_size):
                r, c, k = (t[start : start + batch_size] for t in (r_chunk, c_chunk, k_chunk))
                variants = tokens[r].clone()
                variants[torch.arange(len(r)), c] = replacements[r, c, k]
                cache = None if shared is None else shared.cache(r - first_row, int(c.min()))
                match, token_nll = score_continuations(model, variants, p, past_kv_cache=cache)
                em[r, c, k] = exact_match_length(match).cpu()
                nll[r, c, k] = token_nll.mean(-1).cpu()
                bar.update(len(r))
    bar.close()

    result = PrefixPerturbation(
        paragraphs=paragraphs,
        baseline_em=baseline_em,
        baseline_nll=baseline_nll,
        replacements=replacements,
        em=em,
        nll=nll,
        perturbed=None,
        seed=seed,
    )
    if build_perturbed:
        perturbed = _perturbed_paragraphs(
            model, result, config.batch_size, config.pmp_choice, config.pmp_exclude_last
        )
        result = dataclasses.replace(result, perturbed=perturbed)
    return result


def _perturbed_paragraphs(
    model: HookedModel,
    result: PrefixPerturbation,
    batch_size: int,
    choice: str = "min_em",
    exclude_last: int = 0,
) -> Paragraphs:
    """Each paragraph's prefix perturbed at the chosen variant, plus its greedy continuation."""
    paragraphs = result.paragraphs
    n, p, s = result.em.shape
    allowed = result.em >= 0
    if exclude_last:
        allowed[:, p - exclude_last :] = False
    em = result.em.where(allowed, torch.iinfo(torch.long).max).view(n, p * s)
    if choice == "min_em":
        # Lowest EM first; ties go to the earliest position and sample (argmin: the first).
        flat = em.argmin(-1)
    else:  # largest NLL rise of the original continuation
        flat = result.nll.where(allowed, -torch.inf).view(n, p * s).argmax(-1)
    position, sample = flat // s, flat % s
    rows = torch.arange(n)
    prefixes = paragraphs.prefix.clone()
    replacement = result.replacements[rows, position, sample]
    prefixes[rows, position] = replacement
    continuation = greedy_continuations(
        model, prefixes, paragraphs.continuation_len, batch_size=max(1, batch_size // 4)
    )
    return Paragraphs(
        tokens=torch.cat([prefixes, continuation], dim=1),
        ids=tuple(f"{i}:perturbed" for i in paragraphs.ids),
        prefix_len=p,
        meta={
            **paragraphs.meta,
            "source_id": paragraphs.ids,
            "position": tuple(position.tolist()),
            "original_token": tuple(paragraphs.prefix[rows, position].tolist()),
            "replacement_token": tuple(replacement.tolist()),
            "em_drop": tuple((result.baseline_em - em[rows, flat]).tolist()),
            "chosen_by": (choice,) * n,
        },
        vocab_fingerprint=paragraphs.vocab_fingerprint,
    )
