"""Train a small Llava-Next-Video on synthetic long-video QA, fully offline (scripts/train_video_model.py).

Four stages in one run; every example is drawn fresh from the generator (video.synthetic, split "train") and
fed with the LongVideoBench prompt through the model's own processor and chat template. The reply first says
what it read, then the answer's letter (LongVideoBench's parser reads the first capital A-E): " 3 red B" for the
colour at counter 3, " 2 red 2 circle 5 blue 5 square from a red circle to a blue square D" for a change, " cyan
diamond C" for the first flash, and for "how many times did a red square flash" what flashed at each counter value
with a running tally of the red squares, then the count: " 1 2 red 2 square one 3 4 blue 4 circle 5 red 5 square
two 6 2 B" (`reply_text`, style "reasoned"). Every shape word comes right after the counter value it is read at.

1. text -- the language model alone learns to answer in the LongVideoBench layout when the answer is stated
   ("The answer is cyan." above the options; reply " cyan B"): short text-only sequences.
2. reader -- the language model learns the video questions from *frame codes* in place of the video tokens:
   for each sampled frame, 4 vectors written in the model's own word embeddings (FrameCodes: the counter digit
   + the large shape's colour and shape words, or the flash's). No pixels, so it is cheap; half the batches are
   short evidence clips (`evidence_indices`).
3. vision -- the vision tower and projector learn to emit those codes from the frames run_video.py decodes
   (same uniform frame rule, a simulated H.264 4:2:0 round trip), the language model frozen: LLaVA's alignment
   idea made explicit -- video tokens land where the language model already knows what to do with them.
4. joint -- the whole model end to end on rendered frames: reply cross-entropy + `code_weight` x the stage-3 loss.

Stages 1, 2 and 4 add two training-only losses for the letter: attention supervision (`pointer_loss`: the
position that writes the letter looks at the right option's line) and a read-out of each option line's letter
where that attention reads it (OptionLetters). Measured on this machine on the way here: end-to-end training from
random weights stayed at chance for 1,000+ steps with the letter as the only target and reached 30% with
per-frame heads, captioning and option heads (~55 CPU minutes); the 400-token tokenizer split colour words into
pieces shared across words (now one token each); with frame codes the reader found the answer words (right on
~100% of validation questions by step ~1,000) while the letter stayed at chance for 1,400+ steps, with or
without the two letter losses; the text stage teaches the letter in ~500 steps (98% by step 1,500) and the
reader keeps it. Count questions stayed at chance with the reply " 3 C" (the model answered " 3" to every test
question) and with a listing without the tally (count token right on 20% of 96 validation count questions,
teacher-forced, after 1,000 reader steps); with the tally 71% after 1,500. With count listings in the reader the
shape words were the weak point (colour then shape, " 2 red circle"): teacher-forced on 128 validation questions
after 1,500 reader steps, the two shape words a change reply reads were right 57% of the time (the shape at the
*other* counter value asked about was the commonest mistake) and the count listings' 73%, while every colour word
was right -- the word read right after a counter value was read well, the one after it not. Writing the counter
value again before the shape (" 2 red 2 circle") made them 255 of 256 and 100% at the same point (same text stage,
same 1,500 reader steps); marking the large shape's and the flash's frame-code tokens with role vectors did not
help (random role vectors: shape words 73-74%; E[" left"] / E[" right"]: 44% of validation replies exact vs 52%
without), and repeating the counter in change replies only (not in the count listings) left change replies behind
(22% exact on validation after 1,000 reader steps vs 66%). Selection on 200 validation videos through run_video.py:
one run with the defaults (text 1,500, reader 4,500, vision 400, joint 400 steps; the shipped model) 96.0%; the
same reader length split 1,500 + 3,000 with the schedule restarted 85.0% (colour at a counter value 80%, count
64%). The saved model is a plain LlavaNextVideoForConditionalGeneration; codes and heads are training-only.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from video.datasets import LETTERS, VideoQASample
from video.decoding import sample_indices
from video.prompts import conversation, lvb_prompt
from video.synthetic import COLOURS, NUM_OPTIONS, SHAPES, Scene, SyntheticConfig, make_sample, render
from video.tiny_model import SMALL, ModelSize, build_tiny_llava_next_video, tokens_per_frame

COLOUR_IDS = {c: i for i, c in enumerate(COLOURS)}
SHAPE_IDS = {s: i for i, s in enumerate(SHAPES)}
MAX_COUNTER = 10
FRAME_LABELS = ("counter", "colour", "shape", "flash_colour", "flash_shape")  # flash_*: 0 = no flash, else id + 1
STAGES = ("text", "reader", "vision", "joint")


@dataclass
class VideoTrainConfig:
    out: str = "runs/video-model"
    text_steps: int = 1500
    reader_steps: int = 4500
    vision_steps: int = 400
    joint_steps: int = 400
    text_lr: float = 1.5e-3
    reader_lr: float = 1.5e-3
    vision_lr: float = 2e-3
    joint_lr: float = 3e-4
    batch_size: int = 32  # text and reader batches; vision and joint use half (pixels cost more than codes)
    min_lr_ratio: float = 0.1  # cosine decay to this share of each stage's lr
    warmup: int = 100
    weight_decay: float = 0.01
    short_share: float = 0.5  # reader stage: share of batches of evidence clips (see evidence_indices)
    code_noise: float = 0.1  # reader stage: Gaussian noise on the codes, relative to their norm
    code_weight: float = 1.0  # joint stage: weight of the code-matching loss
    pointer_weight: float = 1.0  # text + reader + joint: weight of the answer-pointer loss (pointer_loss)
    pointer_layer: int = -1  # ... on head 0 of this language-model layer
    letter_weight: float = 1.0  # text + reader + joint: weight of the option-letter loss (OptionLetters)
    frames: int = 32  # frames per video, as run_video.py --frames
    seed: int = 0
    size: ModelSize = field(default_factory=lambda: SMALL)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    reply: str = "reasoned"  # see reply_text: "reasoned", "answer-letter" or "letter"
    init_from: str | None = None  # checkpoint.pt of another run: start from its weights (a new schedule)
    val_samples: int = 128
    stop_after: int | None = None  # end this call after this many steps in all (resumable)
    eval_every: int = 500
    checkpoint_every: int = 100
    workers: int = 1  # data processes (0 = in the training process)
    threads: int = 1  # torch threads of the training process

    @property
    def stage_steps(self) -> tuple[int, ...]:
        return tuple(getattr(self, f"{name}_steps") for name in STAGES)

    @property
    def total_steps(self) -> int:
        return sum(self.stage_steps)

    def stage_at(self, step: int) -> tuple[str, int, int]:
        """(stage, step within the stage, the stage's length) of global step `step` (0-based)."""
        for name, n in zip(STAGES, self.stage_steps):
            if step < n:
                return name, step, n
            step -= n
        raise ValueError("step past the end of training")


# ------------------------------------------------------------------------------------------------ data


def frame_labels(scene: Scene, indices: np.ndarray) -> np.ndarray:
    """(F, 5) int64 per decoded frame: counter, large colour, large shape, flash colour + 1, flash shape + 1."""
    out = np.zeros((len(indices), len(FRAME_LABELS)), np.int64)
    for row, t in enumerate(indices):
        k = scene.counter_at(t)
        colour, shape = scene.segments[k - 1]
        out[row, :3] = (min(k, MAX_COUNTER - 1), COLOUR_IDS[colour], SHAPE_IDS[shape])
        flash = scene.flash_at(t)
        if flash is not None:
            out[row, 3:] = (COLOUR_IDS[flash[1]] + 1, SHAPE_IDS[flash[2]] + 1)
    return out


def yuv420_roundtrip(frames: np.ndarray, rng: np.random.Generator, noise: float = 2.0) -> np.ndarray:
    """Frames as an H.264 yuv420p file returns them, roughly: BT.601 YCbCr, 2x2-averaged chroma, + luma noise.

    Without noise this is closer to a real crf-12 round trip than the raw frames are (tested); the default noise
    (sigma 2 on luma) is augmentation on top."""
    x = frames.astype(np.float32)
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    y = 16 + (65.481 * r + 128.553 * g + 24.966 * b) / 255
    cb = 128 + (-37.797 * r - 74.203 * g + 112.0 * b) / 255
    cr = 128 + (112.0 * r - 93.786 * g - 18.214 * b) / 255

    def down_up(c: np.ndarray) -> np.ndarray:
        t, h, w = c.shape
        c = c.reshape(t, h // 2, 2, w // 2, 2).mean(axis=(2, 4))
        return c.repeat(2, axis=1).repeat(2, axis=2)

    cb, cr = down_up(cb), down_up(cr)
    y = y + rng.normal(0, noise, y.shape)
    yy, cb, cr = (y - 16) * 255 / 219, (cb - 128) * 255 / 224, (cr - 128) * 255 / 224
    rgb = np.stack([yy + 1.402 * cr, yy - 0.344136 * cb - 0.714136 * cr, yy + 1.772 * cb], axis=-1)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def qa_sample(qa: dict, name: str) -> VideoQASample:
    return VideoQASample(id=name, video_path="", question=qa["question"], options=qa["candidates"],
                         answer=qa["correct_choice"], dataset="synthetic", category=qa["kind"])


REPLY_STYLES = ("reasoned", "answer-letter", "letter")


TALLY = ("one", "two", "three", "four", "five")


def seen_at(k: int, colour: str, shape: str) -> str:
    """An object as a reply names it, read at counter value k: "red 2 square" -- the counter value again right
    before the shape word, so the shape is read at k (see the module docstring for what that fixed)."""
    return f"{colour} {k} {shape}"


def flash_listing(scene: Scene, indices: np.ndarray, target: tuple[str, str] | None = None) -> str:
    """What flashed, counter value by counter value, as the frames `indices` show it: " 1 2 red 2 square one 3 4 blue
    4 circle ..." -- each counter value seen, then each flash that starts showing while it is on (time order)
    (seen_at: colour, the counter value again, shape); each flash of `target` followed by the running tally
    (TALLY words: "one", "two", ...)."""
    out, last_counter, seen, tally = [], None, set(), 0
    for t in indices:
        k = scene.counter_at(t)
        if k != last_counter:
            out.append(str(k))
            last_counter = k
        flash = scene.flash_at(t)
        if flash is not None and flash[0] not in seen:
            seen.add(flash[0])
            out.append(seen_at(k, *flash[1:]))
            if flash[1:] == target:
                out.append(TALLY[tally])  # count questions exist for counts 1..5 only
                tally += 1
    return " " + " ".join(out)


def reply_text(sample: VideoQASample, style: str = "answer-letter", scene: Scene | None = None,
               evidence: list | None = None, indices: np.ndarray | None = None) -> str:
    """The target reply. "letter": "B". "answer-letter": " red B" (the right option's text, then its letter).
    "reasoned" (needs the scene, the evidence ranges and the frames shown): for questions about counter values,
    first the counter value(s) and what the large shape was then -- " 3 red B", " 2 red 2 circle 5 blue 5 square
    from a red circle to a blue square D" (seen_at: the counter value again before each shape word); for count
    questions, first what flashed at each counter value with a running tally of the asked-about flash
    (flash_listing), then the count -- " 1 2 red 2 square one 3 4 blue 4 circle 5 red 5 square two 6 2 B";
    otherwise as "answer-letter". Option texts are lower-case words and digits, so LongVideoBench's parser (first
    capital A-E) reads the letter."""
    if style == "letter":
        return LETTERS[sample.answer]
    answer = f" {sample.options[sample.answer]} {LETTERS[sample.answer]}"
    if style == "answer-letter":
        return answer
    if style != "reasoned":
        raise ValueError(f"reply style must be one of {REPLY_STYLES}, got {style!r}")
    counters = [scene.counter_at(start) for start, _ in evidence]  # counter value(s) of the evidence
    if sample.category == "colour_at_count":
        k = counters[0]
        return f" {k} {scene.segments[k - 1][0]} {LETTERS[sample.answer]}"
    if sample.category == "change":
        return " " + " ".join(f"{k} {seen_at(k, *scene.segments[k - 1])}" for k in counters) + answer
    if sample.category == "count_event":
        target = next((c, s) for start, c, s in scene.flashes if start == evidence[0][0])  # a flash counted
        return flash_listing(scene, indices, target) + answer
    return answer


def prompt_ids(processor, prompt: str, num_frames: int) -> list[int]:
    """The ids the processor gives for `prompt` with a video of `num_frames` frames, without decoding pixels:
    the chat template's single <video> expanded to num_frames x tokens_per_frame video tokens (tested equal)."""
    tok = processor.tokenizer
    ids = tok(processor.apply_chat_template(conversation(prompt), add_generation_prompt=True))["input_ids"]
    video = tok.convert_tokens_to_ids(processor.video_token)
    at = ids.index(video)
    return ids[:at] + [video] * (num_frames * tokens_per_frame(processor)) + ids[at + 1:]


def with_reply(processor, ids: list[int], reply_str: str, answer: int) -> dict:
    """input_ids = ids + reply + </s>, labels (-100 except on the reply), the option lines' last tokens
    (`option_ends`) and the right option's index (`answer`)."""
    tok = processor.tokenizer
    reply = tok(reply_str, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    input_ids = torch.tensor(ids + reply)
    return dict(input_ids=input_ids, labels=torch.tensor([-100] * len(ids) + reply), answer=answer,
                option_ends=option_ends(input_ids, tok.convert_tokens_to_ids("\u010a")))  # byte-level BPE's "\n"


def clip_frames(scene: Scene, idx: np.ndarray, cfg: VideoTrainConfig, index: int, simulate_codec: bool = True
                ) -> np.ndarray:
    """The rendered frames `idx` of the scene, through the simulated codec (seeded by cfg.seed and `index`)."""
    frames = render(scene, cfg.synthetic.size, idx)
    return yuv420_roundtrip(frames, np.random.default_rng([cfg.seed, 7, index])) if simulate_codec else frames


def evidence_indices(scene: Scene, qa: dict) -> np.ndarray:
    """A short clip that still answers the question: two frames from each evidence range in time order (for flash
    questions also two from the empty slot after each flash, so separate flashes stay separate)."""
    out: list[int] = []
    for a, b in sorted(map(tuple, qa["evidence"])):
        ranges = [(a, b)]
        if qa["kind"] in ("count_event", "first_event") and b < scene.num_frames:
            ranges.append((b, min(b + scene.unit, scene.num_frames)))
        for lo, hi in ranges:
            out += [lo + (hi - lo) // 3, lo + 2 * (hi - lo) // 3]
    return np.array(out, dtype=np.int64)


def make_example(processor, index: int, split: str, cfg: VideoTrainConfig, pixels: bool = True,
                 text: bool = True, simulate_codec: bool = True, short: bool = False) -> dict:
    """One example of `split`, deterministic in (cfg.seed, split, index): frame labels, and the prompt + reply ids
    (`text`) and the processor's pixel values of the decoded frames (`pixels`); `short`: an evidence clip
    (evidence_indices) instead of the uniform sampling run_video.py does."""
    scene, qa = make_sample(cfg.seed, split, index, cfg.synthetic)
    idx = evidence_indices(scene, qa) if short else sample_indices(scene.num_frames, cfg.frames)
    ex = dict(frame_labels=torch.from_numpy(frame_labels(scene, idx)), kind=qa["kind"])
    if text:
        sample = qa_sample(qa, f"{split}_{index}")
        ids = prompt_ids(processor, lvb_prompt(sample), len(idx))
        ex.update(with_reply(processor, ids, reply_text(sample, cfg.reply, scene, qa["evidence"], idx), sample.answer))
    if pixels:
        frames = clip_frames(scene, idx, cfg, index, simulate_codec)
        ex["pixel_values_videos"] = processor.video_processor(videos=frames, return_tensors="pt")["pixel_values_videos"][0]
    return ex


def make_text_example(processor, index: int, split: str, cfg: VideoTrainConfig) -> dict:
    """A text-only option-letter example (stage "text"): the answer is stated, the options follow in the
    LongVideoBench layout, the reply repeats the answer and writes its letter (" cyan B")."""
    _, qa = make_sample(cfg.seed, split, index, cfg.synthetic)
    sample = qa_sample(qa, f"{split}_{index}")
    text = f"\nThe answer is {sample.options[sample.answer]}.\n" + lvb_prompt(sample).split("\n", 1)[1]
    chat = [{"role": "user", "content": [{"type": "text", "text": text}]}]
    ids = processor.tokenizer(processor.apply_chat_template(chat, add_generation_prompt=True))["input_ids"]
    return dict(frame_labels=torch.zeros((0, len(FRAME_LABELS)), dtype=torch.long), kind=qa["kind"],
                **with_reply(processor, ids, reply_text(sample, "answer-letter"), sample.answer))


def collate(examples: list[dict], pad_id: int) -> dict:
    """Right-pad the ids (labels with -100) and the frame labels (evidence clips differ in length); stack pixels."""
    frames = max(1, max(len(e["frame_labels"]) for e in examples))
    labels = torch.zeros((len(examples), frames, len(FRAME_LABELS)), dtype=torch.long)
    for i, e in enumerate(examples):
        labels[i, : len(e["frame_labels"])] = e["frame_labels"]
    out = dict(frame_labels=labels, num_frames=torch.tensor([len(e["frame_labels"]) for e in examples]),
               kind=[e["kind"] for e in examples])
    if "input_ids" in examples[0]:
        n = max(len(e["input_ids"]) for e in examples)
        out["input_ids"] = torch.full((len(examples), n), pad_id, dtype=torch.long)
        out["labels"] = torch.full((len(examples), n), -100, dtype=torch.long)
        out["attention_mask"] = torch.zeros((len(examples), n), dtype=torch.long)
        for i, e in enumerate(examples):
            out["input_ids"][i, : len(e["input_ids"])] = e["input_ids"]
            out["labels"][i, : len(e["labels"])] = e["labels"]
            out["attention_mask"][i, : len(e["input_ids"])] = 1
        out["option_ends"] = torch.stack([e["option_ends"] for e in examples])
        out["answer"] = torch.tensor([e["answer"] for e in examples])
    if "pixel_values_videos" in examples[0]:
        out["pixel_values_videos"] = torch.stack([e["pixel_values_videos"] for e in examples])
    return out


def stage_batch(processor, cfg: VideoTrainConfig, stage: str, split: str, indices: range, short: bool = False) -> dict:
    """A batch for `stage`: text = text only, reader = text + labels, vision = pixels + labels, joint = everything."""
    if stage == "text":
        return collate([make_text_example(processor, i, split, cfg) for i in indices], processor.tokenizer.pad_token_id)
    exs = [make_example(processor, i, split, cfg, pixels=stage != "reader", text=stage != "vision", short=short)
           for i in indices]
    return collate(exs, processor.tokenizer.pad_token_id)


def batch_size(cfg: VideoTrainConfig, stage: str) -> int:
    return cfg.batch_size if stage in ("text", "reader") else max(1, cfg.batch_size // 2)


class TrainStream(torch.utils.data.Dataset):
    """Item i = the batch of global step start + i; a resumed run sees exactly the batches it has not seen."""

    def __init__(self, processor, cfg: VideoTrainConfig, start: int):
        self.processor, self.cfg, self.start = processor, cfg, start

    def __len__(self) -> int:
        return last_step(self.cfg) - self.start

    def __getitem__(self, i: int) -> dict:
        torch.set_num_threads(1)
        step = self.start + i
        stage, _, _ = self.cfg.stage_at(step)
        b = batch_size(self.cfg, stage)
        short = stage == "reader" and np.random.default_rng([self.cfg.seed, 13, step]).random() < self.cfg.short_share
        return stage_batch(self.processor, self.cfg, stage, "train", range(step * self.cfg.batch_size,
                                                                          step * self.cfg.batch_size + b), short)


# ----------------------------------------------------------------------------------------------- model


class FrameCodes(nn.Module):
    """The video tokens a frame should become, written in the language model's word embeddings.

    Token j of a frame = E[" <counter>"] + (E[" <colour>"] + E[" <shape>"] of the large shape if j is even, of the
    flash if j is odd -- nothing without a flash) + slot[j], slot a fixed random vector (seeded) per token."""

    def __init__(self, tokenizer, dim: int, tokens_per_frame: int, seed: int = 0):
        super().__init__()
        word = lambda w: tokenizer.convert_tokens_to_ids("\u0120" + w)  # noqa: E731 -- byte-level BPE's " w"
        ids = [word(str(i)) for i in range(MAX_COUNTER)] + [word(c) for c in COLOURS] + [word(s) for s in SHAPES]
        if tokenizer.unk_token_id in ids:
            raise ValueError("the tokenizer lacks single tokens for the synthetic set's words")
        self.register_buffer("digit", torch.tensor(ids[:MAX_COUNTER]), persistent=False)
        self.register_buffer("colour", torch.tensor(ids[MAX_COUNTER:MAX_COUNTER + len(COLOURS)]), persistent=False)
        self.register_buffer("shape", torch.tensor(ids[MAX_COUNTER + len(COLOURS):]), persistent=False)
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("slot", torch.randn(tokens_per_frame, dim, generator=g) * 0.02, persistent=False)

    def forward(self, labels: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        """labels (B, F, 5), embedding (V, D) -> codes (B, F * tokens_per_frame, D)."""
        e = embedding
        counter = e[self.digit[labels[..., 0]]]
        large = e[self.colour[labels[..., 1]]] + e[self.shape[labels[..., 2]]]
        has_flash = (labels[..., 3] > 0)[..., None].to(e.dtype)
        flash = has_flash * (e[self.colour[(labels[..., 3] - 1).clamp(min=0)]]
                             + e[self.shape[(labels[..., 4] - 1).clamp(min=0)]])
        per_token = [large if j % 2 == 0 else flash for j in range(len(self.slot))]
        codes = torch.stack([counter + x for x in per_token], dim=2) + self.slot
        return codes.flatten(1, 2)


def option_ends(input_ids: torch.Tensor, newline_id: int) -> torch.Tensor:
    """(5,) positions of the last token of each option line: option lines are the 3rd to 7th lines of the prompt
    ("USER: <video>", the question, "A. red", ..., "E. cyan")."""
    return (input_ids == newline_id).nonzero().flatten()[2:2 + NUM_OPTIONS] - 1


def answer_positions(labels: torch.Tensor, option_ends: torch.Tensor, answer: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(position that predicts the reply's letter, last token of the right option's line) per row of (B, T) labels:
    the letter is the reply's second-to-last token (before </s>), the reply the last labelled tokens."""
    positions = torch.arange(labels.shape[1]).expand_as(labels)
    last = torch.where(labels != -100, positions, -1).amax(dim=1)  # the </s> of each reply
    return last - 2, option_ends.gather(1, answer[:, None]).squeeze(1)


def pointer_loss(attention: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """-log of the attention (head 0 of one layer, (B, H, T, T)) from the position that writes the letter to the
    right option's line. Training-only: answering is "find the line that says the answer, write its letter", and
    with only the letter as reward neither the lookup nor what it reads gets a signal until both work -- measured
    here: the letter stayed at chance for 1,400+ reader steps while the answer words were already right."""
    rows = torch.arange(len(src))
    return -torch.log(attention[rows, 0, src, dst] + 1e-6).mean()


class OptionLetters(nn.Module):
    """Training-only read-out: the last token of each option line ("B. cyan\n": " cyan"), as it enters the
    pointer layer, names its line's letter -- so what the pointer finds holds the letter to write."""

    def __init__(self, dim: int):
        super().__init__()
        self.head = nn.Linear(dim, NUM_OPTIONS)

    def forward(self, states: torch.Tensor, option_ends: torch.Tensor) -> torch.Tensor:
        """states (B, T, D), option_ends (B, 5) -> cross-entropy of each option's letter."""
        picked = states.gather(1, option_ends[..., None].expand(-1, -1, states.shape[-1]))  # (B, 5, D)
        target = torch.arange(NUM_OPTIONS).expand(len(states), -1)
        return F.cross_entropy(self.head(picked).flatten(0, 1), target.flatten())


def video_features(model, pixel_values_videos: torch.Tensor) -> torch.Tensor:
    """(B, F * tokens_per_frame, D): the projected, pooled video tokens the language model reads."""
    return model.model.get_video_features(pixel_values_videos, return_dict=True).pooler_output


def code_error(features: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Per-token squared error relative to the code's squared norm."""
    return ((features - codes) ** 2).sum(-1) / (codes ** 2).sum(-1)


def reply_loss(model, batch: dict, video_tokens: torch.Tensor, cfg: VideoTrainConfig,
               letters: OptionLetters | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(cross-entropy on the reply tokens, per row: is the teacher-forced argmax right at every reply token -- i.e.
    does greedy decoding give the reply, the weighted letter losses: cfg.pointer_weight x pointer_loss +
    cfg.letter_weight x `letters`, or 0 when cfg.pointer_weight is 0) with `video_tokens` (N, D), row after row,
    in place of the <video> placeholders."""
    pointer_on = cfg.pointer_weight > 0
    inner = model.model
    embeds = inner.get_input_embeddings()(batch["input_ids"])
    mask = (batch["input_ids"] == model.config.video_token_index).unsqueeze(-1).expand_as(embeds)
    embeds = embeds.masked_scatter(mask, video_tokens.to(embeds.dtype))
    out = inner.language_model(inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                               output_attentions=pointer_on, output_hidden_states=pointer_on and letters is not None)
    hidden = out.last_hidden_state
    aux = torch.zeros(())
    if pointer_on:
        src, dst = answer_positions(batch["labels"], batch["option_ends"], batch["answer"])
        aux = cfg.pointer_weight * pointer_loss(out.attentions[cfg.pointer_layer], src, dst)
        if letters is not None:  # hidden_states[i] enters layer i
            layer = cfg.pointer_layer % len(out.attentions)
            aux = aux + cfg.letter_weight * letters(out.hidden_states[layer], batch["option_ends"])
    labels = batch["labels"]
    pos = (labels[:, 1:] != -100).nonzero(as_tuple=True)  # positions whose next token is a reply token
    logits = model.lm_head(hidden[:, :-1][pos])
    target = labels[:, 1:][pos]
    wrong = torch.bincount(pos[0][logits.argmax(-1) != target], minlength=labels.shape[0])
    return F.cross_entropy(logits, target), (wrong == 0).float(), aux


def stage_loss(model, codes: FrameCodes, batch: dict, stage: str, cfg: VideoTrainConfig,
               letters: OptionLetters | None = None) -> tuple[torch.Tensor, dict]:
    """(loss, stats) of one batch of `stage`; `letters`: with the option-letter loss. The language model reads no
    video (text), the frames' codes with noise (reader) or the video features (joint); vision fits the codes."""
    target = codes(batch["frame_labels"], model.get_input_embeddings().weight)
    loss, stats = torch.zeros(()), {}
    if stage in ("vision", "joint"):
        features = video_features(model, batch["pixel_values_videos"])
        err = code_error(features, target.detach()).mean()
        if stage == "vision":
            return err, dict(code_error=err.item())
        loss, stats, tokens = cfg.code_weight * err, dict(code_error=err.item()), features.flatten(0, 1)
    elif stage == "reader":
        per_frame = target.shape[1] // batch["frame_labels"].shape[1]
        frames = torch.arange(batch["frame_labels"].shape[1])[None, :] < batch["num_frames"][:, None]
        target = target[frames.repeat_interleave(per_frame, dim=1)]  # (N, D): the real frames' codes, row by row
        tokens = target + cfg.code_noise * torch.randn_like(target) * target.norm(dim=-1, keepdim=True) / math.sqrt(
            target.shape[-1])
    else:
        tokens = target.new_zeros((0, target.shape[-1]))
    reply, correct, aux = reply_loss(model, batch, tokens, cfg, letters)
    return loss + reply + aux, dict(reply_loss=reply.item(), **stats, pointer_loss=aux.item(), reply_correct=correct)


def trainable(model, stage: str, letters: OptionLetters | None = None) -> list[nn.Parameter]:
    """reader: the language model (+ head, + `letters`); vision: vision tower + projector; joint: everything."""
    vision = ("vision_tower", "multi_modal_projector", "image_newline")
    out = [] if letters is None or stage == "vision" else list(letters.parameters())
    for name, p in model.named_parameters():
        is_vision = any(v in name for v in vision)
        if stage == "joint" or (stage == "vision") == is_vision:
            out.append(p)
    return out


# ------------------------------------------------------------------------------------------------ loop


def last_step(cfg: VideoTrainConfig) -> int:
    return min(cfg.total_steps, cfg.stop_after or cfg.total_steps)


def lr_at(step: int, cfg: VideoTrainConfig) -> float:
    """Per stage: linear warm-up, then cosine decay to min_lr_ratio x the stage's lr at its last step."""
    stage, s, n = cfg.stage_at(step)
    peak = getattr(cfg, f"{stage}_lr")
    warm = min(cfg.warmup, max(1, n // 10))
    if s < warm:
        return peak * (s + 1) / warm
    t = (s - warm) / max(1, n - warm)
    return peak * (cfg.min_lr_ratio + 0.5 * (1 - cfg.min_lr_ratio) * (1 + math.cos(math.pi * min(1.0, t))))


@torch.no_grad()
def evaluate(model, codes: FrameCodes, batches: list[dict], stage: str, cfg: VideoTrainConfig) -> dict:
    """Validation: the stage's code error and/or the share of replies greedy decoding reproduces exactly, overall
    and per question kind (reader: read from the codes; joint: from the frames)."""
    model.eval()
    hits: dict[str, list[float]] = {}
    errors = []
    for batch in batches:
        _, st = stage_loss(model, codes, batch, stage, replace(cfg, code_noise=0.0))
        if "code_error" in st:
            errors.append(st["code_error"])
        for kind, ok in zip(batch["kind"], st.get("reply_correct", torch.zeros(0)).tolist()):
            hits.setdefault(kind, []).append(ok)
    model.train()
    out = {"val_code_error": float(np.mean(errors))} if errors else {}
    if hits:
        every = [x for v in hits.values() for x in v]
        out.update(val_acc=sum(every) / len(every), **{f"val_{k}": sum(v) / len(v) for k, v in sorted(hits.items())})
    return out


RUN_ONLY = ("out", "eval_every", "checkpoint_every", "workers", "threads", "stop_after", "val_samples")
CHECKPOINT = "a train_video_model checkpoint.pt (model, opt, stage, step, letters, config)"


def _identity(cfg: dict) -> dict:
    """The settings a resumed run must share with its checkpoint."""
    return {k: v for k, v in json.loads(json.dumps(cfg)).items() if k not in RUN_ONLY}


def settings(cfg: VideoTrainConfig) -> dict:
    """What run.json records and a rerun must match: every setting but the run-only ones, plus the content hash
    of --init-from."""
    from namm_transfer.runs import content_hash

    return {**_identity(asdict(cfg)), "init_from_hash": content_hash(cfg.init_from) if cfg.init_from else None}


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | os.PathLike) -> dict:
    """A checkpoint.pt, loaded as data only (no code runs); ValueError naming the file when it is not one."""
    from namm_transfer.checkpoints import load_torch_file

    ckpt = load_torch_file(path, CHECKPOINT)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        raise ValueError(f"{path} is not {CHECKPOINT}: no 'model' state dict")
    return ckpt


def _load_weights(module: nn.Module, state: dict, path) -> None:
    try:
        module.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as err:
        raise ValueError(f"{path}: its weights do not fit this model (other --size?): "
                         f"{str(err).splitlines()[0]}") from None


def _optimizer(model, letters: OptionLetters, stage: str, cfg: VideoTrainConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(trainable(model, stage, letters), lr=getattr(cfg, f"{stage}_lr"),
                             weight_decay=cfg.weight_decay)


def train(cfg: VideoTrainConfig, progress: bool = True, argv: list[str] | None = None) -> Path:
    """Train (resuming from <out>/checkpoint.pt when present); returns <out>/model (save_pretrained form). The
    settings are recorded in <out>/run.json and a rerun with others is refused; <out> is locked while training.
    A resumed run continues exactly (RNG state included), whether it stopped at --stop-after or was killed."""
    from namm_transfer.records import write_json
    from namm_transfer.runs import RUN_FILE, open_run

    out = Path(cfg.out)
    ckpt_path = out / "checkpoint.pt"
    ckpt = load_checkpoint(ckpt_path) if ckpt_path.is_file() else None
    init = load_checkpoint(cfg.init_from) if cfg.init_from and ckpt is None else None
    if ckpt is not None and not (out / RUN_FILE).is_file():  # a folder from before run.json: the checkpoint's
        write_json(out / RUN_FILE, _identity(ckpt.get("config", {})))  # settings are the recorded ones
    with open_run(out, settings(cfg), "scripts/train_video_model.py", argv, fillable=("init_from_hash",)):
        return _train(cfg, out, ckpt, init, progress)


def _train(cfg: VideoTrainConfig, out: Path, ckpt: dict | None, init: dict | None, progress: bool) -> Path:
    from tqdm import tqdm

    from namm_transfer.records import drop_records, write_json

    torch.set_num_threads(cfg.threads)
    model, processor = build_tiny_llava_next_video(cfg.seed, size=cfg.size)
    dim = model.config.text_config.hidden_size
    codes = FrameCodes(processor.tokenizer, dim, tokens_per_frame(processor), cfg.seed)
    letters = OptionLetters(dim) if cfg.letter_weight > 0 else None
    step = 0
    ckpt_path = out / "checkpoint.pt"
    stage = cfg.stage_at(0)[0]
    opt = _optimizer(model, letters, stage, cfg)
    if ckpt is not None:
        _load_weights(model, ckpt["model"], ckpt_path)
        if letters is not None:
            _load_weights(letters, ckpt["letters"], ckpt_path)
        step = int(ckpt["step"])
        if step < cfg.total_steps:
            stage = cfg.stage_at(step)[0]
            opt = _optimizer(model, letters, stage, cfg)
            if ckpt["stage"] == stage:
                opt.load_state_dict(ckpt["opt"])
    elif init is not None:
        _load_weights(model, init["model"], cfg.init_from)
        saved = init.get("letters")
        if letters is not None and saved is not None and saved["head.weight"].shape == letters.head.weight.shape:
            letters.load_state_dict(saved)
    drop_records(out / "log.jsonl", lambda row: row.get("step", 0) > step)  # rows after the checkpoint: redone
    write_json(out / "config.json", asdict(cfg))
    val: dict[str, list[dict]] = {}  # validation batches, built when first needed: "text", or "joint" for the rest

    def validation(stage: str) -> list[dict]:
        kind = "text" if stage == "text" else "joint"
        if kind not in val:
            n = batch_size(cfg, kind)
            val[kind] = [stage_batch(processor, cfg, kind, "val", range(j, min(j + n, cfg.val_samples)))
                         for j in range(0, cfg.val_samples, n)]
        return val[kind]

    loader = torch.utils.data.DataLoader(TrainStream(processor, cfg, step), batch_size=None, shuffle=False,
                                         num_workers=cfg.workers, prefetch_factor=4 if cfg.workers else None)
    batches = iter(loader)  # draws the loader's seed from the global RNG, as it did when the run started
    if ckpt is not None and ckpt.get("torch_rng") is not None:
        torch.set_rng_state(ckpt["torch_rng"])  # so the random stream continues where the checkpoint left it
    model.train()
    bar = tqdm(total=last_step(cfg), initial=step, disable=not progress, desc="train video model")
    with open(out / "log.jsonl", "a") as log:
        for batch in batches:
            t0 = time.perf_counter()
            now = cfg.stage_at(step)[0]
            if now != stage:  # a new stage: its own parameters and optimiser
                stage, opt = now, _optimizer(model, letters, now, cfg)
            for g in opt.param_groups:
                g["lr"] = lr_at(step, cfg)
            loss, st = stage_loss(model, codes, batch, stage, cfg, letters)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(opt.param_groups[0]["params"], 1.0)
            opt.step()
            step += 1
            correct = st.pop("reply_correct", None)
            row = dict(step=step, stage=stage, loss=loss.item(), **st, lr=opt.param_groups[0]["lr"],
                       train_acc=correct.mean().item() if correct is not None else None,
                       seconds=time.perf_counter() - t0)
            stage_end = step == cfg.total_steps or cfg.stage_at(step)[0] != stage
            if step % cfg.eval_every == 0 or step == last_step(cfg) or stage_end:
                with torch.random.fork_rng(devices=[]):  # validation must not move the training RNG: a run
                    row.update(evaluate(model, codes, validation(stage), stage, cfg))  # stopped here resumes exactly
            log.write(json.dumps(row) + "\n")
            log.flush()
            bar.update(1)
            shown = {"val": f"{row['val_acc']:.3f}"} if "val_acc" in row else {}
            bar.set_postfix(stage=stage, loss=f"{row['loss']:.3f}", **shown)
            if step % cfg.checkpoint_every == 0 or step == last_step(cfg) or stage_end:
                _atomic_save(dict(model=model.state_dict(), opt=opt.state_dict(), stage=stage, step=step,
                                  letters=letters.state_dict() if letters is not None else None,
                                  config=json.loads(json.dumps(asdict(cfg))), torch_rng=torch.get_rng_state()),
                             ckpt_path)
    bar.close()
    plot_training_curve(out / "log.jsonl", out / "curve.png")
    final = out / "model"
    model.eval()
    model.save_pretrained(final)
    processor.save_pretrained(final)
    return final


def plot_training_curve(log_path: Path, png: Path) -> Path:
    """Loss and exact-reply accuracy (train smoothed, validation) vs step, stages shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(x) for x in open(log_path) if x.strip()]
    steps = np.array([r["step"] for r in rows])

    def smooth(v: np.ndarray, w: int = 50) -> np.ndarray:
        c = np.cumsum(np.insert(np.nan_to_num(v), 0, 0.0))
        n = np.cumsum(np.insert(~np.isnan(v), 0, 0))
        lo = np.maximum(0, np.arange(len(v)) + 1 - w)
        hi = np.arange(len(v)) + 1
        with np.errstate(invalid="ignore"):
            return (c[hi] - c[lo]) / (n[hi] - n[lo])

    def column(key: str) -> np.ndarray:
        return np.array([np.nan if r.get(key) is None else r[key] for r in rows], dtype=float)

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
    a.plot(steps, smooth(column("reply_loss")), label="reply loss")
    a.plot(steps, smooth(column("code_error")), label="code error (relative)")
    a.set_xlabel("step"), a.set_yscale("log"), a.legend(), a.set_title("training loss (50-step mean)", pad=14)
    b.plot(steps, smooth(column("train_acc")), label="train (50-step mean)")
    ev = [r for r in rows if "val_acc" in r]
    b.plot([r["step"] for r in ev], [r["val_acc"] for r in ev], "o-", label="validation")
    b.axhline(0.2, color="grey", ls=":", label="chance")
    b.set_xlabel("step"), b.set_ylim(0, 1), b.legend(fontsize=8)
    b.set_title("QA replies right at every token (teacher-forced argmax)", fontsize=10, pad=14)
    bounds = np.cumsum([0, *[sum(1 for r in rows if r.get("stage") == name) for name in STAGES]])
    for ax in (a, b):
        for i, name in enumerate(STAGES):
            lo, hi = bounds[i], bounds[i + 1]
            if hi > lo:
                if i % 2 == 1:
                    ax.axvspan(steps[lo], steps[hi - 1], color="grey", alpha=0.1)
                ax.text((steps[lo] + steps[hi - 1]) / 2, 1.0, name, transform=ax.get_xaxis_transform(), ha="center",
                        va="bottom", fontsize=8, color="grey")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png
