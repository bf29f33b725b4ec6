"""One sentence group's S3Gen audio in pieces that join as a whole decode would.

Upstream decodes a group's speech tokens in one call; its streaming switch
crashes. S3GenStreamer re-decodes the mel of all tokens so far on each push with
one noise tensor for the group, vocodes only the frames not yet played, with a
continuous HiFT excitation and a short crossfade (docs/design.md). Worker thread
only.
"""

import math
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..audio import SAMPLE_RATE, Crossfader
from .base import SPEECH_VOCAB_REAL

FRAME_SAMPLES = 480  # one mel frame = 20 ms; 2 frames per token
FRAMES_PER_TOKEN = 2
S3GEN_SIL = 4299  # chatterbox.models.s3gen.const.S3GEN_SIL
SILENCE_TOKENS = 3  # upstream appends 3 S3GEN_SIL tokens to every group
LOOKAHEAD_TOKENS = 3  # the encoder's pre-look-ahead (flow.pre_lookahead_len)


def _cast_ref(ref_dict: Dict[str, Any], device: Any, dtype: Any) -> Dict[str, Any]:
    """A cast copy of the voice's `conds.gen`: upstream casts the caller's dict
    in place (even the prompt tokens to float); we never touch it."""
    ref: Dict[str, Any] = {}
    for key, value in ref_dict.items():
        if isinstance(value, np.ndarray):
            value = torch.from_numpy(value.copy())
        if torch.is_tensor(value):
            if key in ("prompt_token", "prompt_token_len"):
                value = value.to(device=device, dtype=torch.long)
            else:
                value = value.to(device=device, dtype=dtype)
        ref[key] = value
    return ref


def flow_in_bfloat16(s3gen: Any) -> None:
    """Run S3Gen's flow encoder and its flow-matching estimator (most of
    S3Gen's work) under bfloat16 autocast: their matrix products in bfloat16,
    their weights, norms and softmax in float32, and their outputs returned as
    float32, so everything around them (the Euler steps, HiFT, the stream's
    joins) is as before. Replaces the two modules' forward on this instance."""
    for module in (s3gen.flow.encoder, s3gen.flow.decoder.estimator):
        module.forward = _in_bfloat16(module.forward, next(module.parameters()))


def _in_bfloat16(forward: Any, weight: torch.Tensor) -> Any:
    device_type = weight.device.type

    def run(*args: Any, **kwargs: Any) -> Any:
        with torch.autocast(device_type, dtype=torch.bfloat16):
            out = forward(*args, **kwargs)
        if isinstance(out, tuple):
            return tuple(_float(item) for item in out)
        return _float(out)

    return run


def _float(value: Any) -> Any:
    if torch.is_tensor(value) and value.dtype == torch.bfloat16:
        return value.float()
    return value


# Long: upstream's CausalMaskedDiffWithXvec.inference, line for line.
def flow_mel(
    s3gen: Any,
    ref: Dict[str, Any],
    tokens: torch.Tensor,
    noise: torch.Tensor,
    *,
    finalize: bool,
    n_timesteps: int = 2,
) -> torch.Tensor:
    """The mel (1, 80, frames) of `tokens` (1-D long) after the voice prompt.

    What `CausalMaskedDiffWithXvec.inference` does, with two changes: when not
    final the look-ahead frames are cut from the encoder output AND its mask
    (upstream forgets the mask), and the whole starting noise (prompt frames
    included) is `noise`, so that every re-decode of the group starts from the
    same noise. `ref` must be cast already (see _cast_ref).
    """
    from chatterbox.models.s3gen.utils.mask import make_pad_mask

    flow = s3gen.flow
    embedding = F.normalize(torch.atleast_2d(ref["embedding"]), dim=1)
    embedding = flow.spk_embed_affine_layer(embedding)
    prompt_feat = ref["prompt_feat"]
    token = torch.cat([ref["prompt_token"].reshape(1, -1), tokens.reshape(1, -1)], 1)
    token_len = torch.tensor([token.shape[1]], dtype=torch.long, device=token.device)
    mask = (~make_pad_mask(token_len)).unsqueeze(-1).to(embedding)
    h, h_masks = flow.encoder(flow.input_embedding(token.long()) * mask, token_len)
    if not finalize:
        cut = flow.pre_lookahead_len * flow.token_mel_ratio
        h, h_masks = h[:, :-cut], h_masks[..., :-cut]
    mel_len1 = prompt_feat.shape[1]
    h_lengths = h_masks.sum(dim=-1).squeeze(dim=-1)
    h = flow.encoder_proj(h)
    total = h.shape[1]
    conds = torch.zeros([1, total, flow.output_size], device=h.device, dtype=h.dtype)
    conds[:, :mel_len1] = prompt_feat
    conds = conds.transpose(1, 2)
    mask = (~make_pad_mask(h_lengths)).unsqueeze(1).to(h)
    mu = h.transpose(1, 2).contiguous()
    z = noise[:, :, :total].to(mu)
    if getattr(s3gen, "meanflow", False):
        # CausalConditionalCFM.basic_euler without its print() and tqdm bar.
        estimator = flow.decoder.estimator
        dtype = estimator.dtype
        x = z.to(dtype)
        mu, mask, cond, spks = (t.to(dtype) for t in (mu, mask, conds, embedding))
        t_span = torch.linspace(0, 1, n_timesteps + 1, device=mu.device, dtype=dtype)
        for t, r in zip(t_span[:-1], t_span[1:]):
            t, r = t[None], r[None]
            dxdt = estimator.forward(
                x, mask=mask, mu=mu, t=t, spks=spks, cond=cond, r=r
            )
            x = x + (r - t) * dxdt
        feat = x.to(mu.dtype)
    else:  # an older non-distilled S3Gen: noised_mels of full length = our noise
        feat, _ = flow.decoder(
            mu=mu,
            mask=mask,
            spks=embedding,
            cond=conds,
            n_timesteps=n_timesteps,
            noised_mels=z,
        )
    return feat[:, :, mel_len1:]


class S3GenStreamer:
    """One sentence group's audio, made in pieces. Worker thread only.

    Every push re-decodes the mel of all tokens so far (cost grows with the
    group, so the caller should push ever larger pieces), then vocodes only the
    frames not yet played. Holding back `hold_frames` frames (+ the look-ahead)
    gives HiFT right context for what it releases; `context_frames` frames of
    left context let it start mid-signal. The crossfade (20 ms = one mel frame)
    is between two decodes of the same frame with the same excitation, so the
    two sides are in phase: a short fade hides their small difference without
    comb filtering, and it costs no latency since it lies in the held frames.
    """

    def __init__(
        self,
        s3gen: Any,
        ref_dict: Dict[str, Any],
        *,
        n_cfm_timesteps: int = 2,
        max_tokens: int = 1000,
        hold_frames: int = 2,
        context_frames: int = 8,
        crossfade_ms: float = 20.0,
        seed: Optional[int] = None,
    ) -> None:
        self.s3gen = s3gen
        self.n_cfm_timesteps = n_cfm_timesteps
        self.device = s3gen.device
        self.dtype = s3gen.dtype
        self.hold_frames = hold_frames
        self.context_frames = context_frames
        self.crossfade = max(1, int(round(crossfade_ms * SAMPLE_RATE / 1000)))
        if hold_frames * FRAME_SAMPLES < self.crossfade:
            raise ValueError("the crossfade must fit in the held-back frames")
        self._joins = Crossfader(self.crossfade)
        self._trim_fade = s3gen.trim_fade.detach().float().cpu().numpy()
        self.stats: List[Tuple[int, float]] = []
        if seed is None:  # from torch's RNG, so torch.manual_seed still rules
            seed = int(torch.randint(0, 2**62, (1,)).item())
        # Two generators, each drawn in fixed-size blocks in order: the noise of
        # a frame or a sample never depends on how the group was split.
        self._mel_rng = torch.Generator().manual_seed(seed)
        self._source_rng = torch.Generator().manual_seed(seed + 1)
        with torch.inference_mode():
            self._ref = _cast_ref(ref_dict, self.device, self.dtype)
            self._prompt_frames = int(self._ref["prompt_feat"].shape[1])
            source = s3gen.mel2wav.m_source
            self._sine = source.l_sin_gen
            self._merge = (source.l_linear, source.l_tanh)
            harmonics = self._sine.harmonic_num + 1
            # SineGen: a random start phase for each overtone, none for f0.
            phases = torch.rand(
                harmonics, 1, generator=self._source_rng, dtype=torch.float64
            )
            self._harmonic_phase = (2 * phases - 1) * math.pi
            self._harmonic_phase[0] = 0.0
            self._noise = torch.zeros(1, 80, 0, device=self.device, dtype=self.dtype)
            self._source_noise = torch.zeros(harmonics, 0)
            self._grow_noise(max_tokens + SILENCE_TOKENS)
            # The excitation of every sample made so far, and the phase integral
            # (in cycles, per harmonic) where it ends.
            self._source = torch.zeros(0, device=self.device)
            self._cycles = torch.zeros(harmonics, 1, dtype=torch.float64)
        self._tokens: List[int] = []
        self._emitted = 0  # samples returned so far
        self._finished = False

    def _grow_noise(self, tokens: int) -> None:
        """Mel noise for the prompt and `tokens` tokens, 50 frames a block."""
        frames = self._prompt_frames + FRAMES_PER_TOKEN * tokens
        blocks = []
        have = self._noise.shape[2]
        while have < frames:
            blocks.append(torch.randn(50, 80, generator=self._mel_rng).T)
            have += 50
        if blocks:
            more = torch.cat(blocks, dim=1)[None].to(self.device, self.dtype)
            self._noise = torch.cat([self._noise, more], dim=2)

    def _grow_source_noise(self, samples: int) -> None:
        """SineGen's noise (one row per harmonic) for `samples` samples, made
        as needed (a long group's would be tens of MB), 4800 samples a block."""
        blocks = [self._source_noise]
        have = self._source_noise.shape[1]
        while have < samples:
            rows = self._source_noise.shape[0]
            blocks.append(torch.randn(rows, 4800, generator=self._source_rng))
            have += 4800
        if len(blocks) > 1:
            self._source_noise = torch.cat(blocks, dim=1)

    # -- the public interface -------------------------------------------------

    def push(self, tokens: Sequence[int]) -> np.ndarray:
        """Add speech tokens; return the audio that is now final (maybe none).

        Returns empty without running the model while the new tokens would
        release less than one crossfade of audio.
        """
        self._add(tokens)
        frames = FRAMES_PER_TOKEN * (len(self._tokens) - LOOKAHEAD_TOKENS)
        release = (frames - self.hold_frames) * FRAME_SAMPLES
        if release - self._emitted < max(self.crossfade, FRAME_SAMPLES):
            return np.zeros(0, np.float32)
        return self._decode(final=False)

    def finish(self, tokens: Sequence[int] = ()) -> np.ndarray:
        """The end of the group (its last tokens may come with it): append the
        silence tokens like upstream, decode with finalize, return the rest.

        `finish(all_tokens)` on a fresh streamer is the whole-group decode.
        """
        self._add(tokens)
        self._tokens.extend([S3GEN_SIL] * SILENCE_TOKENS)
        self._finished = True
        return self._decode(final=True)

    # -- the work ---------------------------------------------------------------

    def _add(self, tokens: Sequence[int]) -> None:
        if self._finished:
            raise RuntimeError("the group is finished")
        new = [int(t) for t in tokens]
        if any(t < 0 or t >= SPEECH_VOCAB_REAL for t in new):
            raise ValueError(f"speech tokens must be in [0, {SPEECH_VOCAB_REAL})")
        self._tokens.extend(new)
        with torch.inference_mode():
            self._grow_noise(len(self._tokens) + SILENCE_TOKENS)

    def _decode(self, final: bool) -> np.ndarray:
        started = time.monotonic()
        with torch.inference_mode():
            tokens = torch.tensor(self._tokens, dtype=torch.long, device=self.device)
            mel = flow_mel(
                self.s3gen,
                self._ref,
                tokens,
                self._noise,
                finalize=final,
                n_timesteps=self.n_cfm_timesteps,
            ).to(self.dtype)
            frames = mel.shape[2]
            release = (frames - (0 if final else self.hold_frames)) * FRAME_SAMPLES
            audio = self._vocode(mel, release, final)
        self.stats.append((len(self._tokens), time.monotonic() - started))
        return audio

    def _vocode(self, mel: torch.Tensor, release: int, final: bool) -> np.ndarray:
        """HiFT on the frames from (played - context) to the end of `mel`;
        return the samples up to `release`, the first ones crossfaded with the
        held tail, and hold the next crossfade's worth back."""
        hift = self.s3gen.mel2wav
        first = max(0, self._emitted // FRAME_SAMPLES - self.context_frames)
        chunk = mel[:, :, first:]
        start = first * FRAME_SAMPLES
        end = mel.shape[2] * FRAME_SAMPLES
        keep = end if final else release + self.crossfade
        source = self._excitation(hift, chunk, start, end, keep)
        wav = hift.decode(x=chunk, s=source.reshape(1, 1, -1).to(chunk.dtype))
        wav = wav.reshape(-1).float().cpu().numpy()
        out = self._joins.join(wav, self._emitted - start, release - start, final)
        # Upstream's start fade, at the group's first samples wherever they are.
        if self._emitted < len(self._trim_fade):
            m = min(len(out), len(self._trim_fade) - self._emitted)
            out[:m] *= self._trim_fade[self._emitted : self._emitted + m]
        self._emitted = release
        return np.clip(out, -1.0, 1.0).astype(np.float32)

    def _excitation(
        self, hift: Any, chunk: torch.Tensor, start: int, end: int, keep: int
    ) -> torch.Tensor:
        """HiFT's sine+noise source for samples [start, end): SineGen and
        SourceModuleHnNSF's maths, but continuous over the group. Samples made
        before are reused; new ones continue the phase integral. Only those up
        to `keep` (the end of the held tail) are frozen: later ones are made
        again next time from a better f0 (more right context)."""
        made = self._source.shape[0]
        if end > made:
            f0 = hift.f0_predictor(chunk)  # (1, frames)
            f0 = hift.f0_upsamp(f0[:, None]).reshape(-1)[made - start :]
            f0 = f0.to(torch.float64).cpu()
            sine = self._sine
            harmonics = torch.arange(
                1, sine.harmonic_num + 2, dtype=torch.float64
            ).reshape(-1, 1)
            cycles = self._cycles + torch.cumsum(
                f0[None] * harmonics / sine.sampling_rate, dim=1
            )
            waves = sine.sine_amp * torch.sin(
                2 * math.pi * (cycles % 1.0) + self._harmonic_phase
            )
            uv = (f0 > sine.voiced_threshold).to(torch.float64)
            noise_amp = uv * sine.noise_std + (1 - uv) * sine.sine_amp / 3
            self._grow_source_noise(end)
            noise = self._source_noise[:, made:end].to(torch.float64)
            waves = waves * uv + noise_amp * noise
            linear, tanh = self._merge
            new = tanh(linear(waves.T.to(self.device, linear.weight.dtype)))
            frozen = max(0, min(keep, end) - made)
            if frozen:
                self._cycles = cycles[:, frozen - 1 : frozen] % 1.0
            source = torch.cat([self._source, new.reshape(-1).float()])
            self._source = source[: made + frozen]
        else:
            source = self._source
        return source[start:end]
