"""Train a small Llava-Next-Video on synthetic long-video QA, fully offline (scripts/train_video_model.py).

Each training example is drawn fresh from the generator (video.synthetic, split "train"): the scene is rendered,
the frames that `run_video.py` would decode are picked with the same uniform rule, passed through a simulated
H.264 4:2:0 round trip (the colour loss the mp4 files have), and fed with the LongVideoBench prompt through the
model's own processor and chat template. The target reply is the letter ("B</s>") or, with `reply="answer-letter"`,
the right option's text and then the letter ("green B</s>").

Loss = cross-entropy on the reply tokens + `aux_weight` x auxiliary cross-entropies from linear heads:
  per video token, from the layer-normed projector output: counter value, colour and shape of the large shape,
  colour and shape of the flash (if any) -- every token tells its whole frame. (Measured here: heads reading the
  raw projector output drove its norm to ~80 against ~0.25 for text embeddings and the language model stayed at
  chance; heads reading a frame's 4 tokens jointly left the language model a two-hop lookup -- counter in one
  token, colour in another -- and it stayed at chance for 1,000 steps.)
  per option, from the language model's state at the end of the option line: which option is right (softmax over
  the 5) -- matching option text to the video before the letter has to be produced.
The heads are dropped at the end: the saved model is a plain LlavaNextVideoForConditionalGeneration.

Curriculum: captioning examples (prompt "Describe the video.", reply: the large shape at each counter value and
the flashes, in order; a share `caption_start` falling to `caption_end`) align video tokens with words, as LLaVA's
first training stage does; a share of each batch (`easy_start` falling to `easy_end`) are evidence-only clips -- the same question
and answer, but the frames come from the evidence ranges only (`evidence_indices`), so option-to-picture matching
is learned before finding the moment in a long video.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from video.datasets import LETTERS, VideoQASample
from video.decoding import sample_indices
from video.prompts import conversation, lvb_prompt
from video.synthetic import COLOURS, SHAPES, Scene, SyntheticConfig, make_sample, render
from video.tiny_model import SMALL, ModelSize, build_tiny_llava_next_video, tokens_per_frame

COLOUR_IDS = {c: i for i, c in enumerate(COLOURS)}
SHAPE_IDS = {s: i for i, s in enumerate(SHAPES)}
MAX_COUNTER = 10
# (name, classes) of the per-frame auxiliary targets; "flash" targets use class 0 for "no flash"
AUX_TARGETS = (("counter", MAX_COUNTER), ("colour", len(COLOURS)), ("shape", len(SHAPES)),
               ("flash_colour", len(COLOURS) + 1), ("flash_shape", len(SHAPES) + 1))


@dataclass
class VideoTrainConfig:
    out: str = "runs/video-model"
    steps: int = 6000
    batch_size: int = 16
    lr: float = 1e-3
    min_lr: float = 5e-5
    warmup: int = 200
    weight_decay: float = 0.01
    aux_weight: float = 1.0
    frames: int = 32  # frames per video, as run_video.py --frames
    seed: int = 0
    size: ModelSize = field(default_factory=lambda: SMALL)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    val_samples: int = 128
    stop_after: int | None = None  # end this call after this many steps (the schedule still spans `steps`)
    eval_every: int = 250
    checkpoint_every: int = 100
    easy_start: float = 0.6  # curriculum: share of evidence-only clips at step 0 ...
    easy_end: float = 0.1  # ... falling linearly to this share ...
    easy_until: float = 0.5  # ... at this fraction of the steps
    caption_start: float = 0.5  # share of captioning examples at step 0, falling linearly ...
    caption_end: float = 0.05  # ... to this share at easy_until x steps
    reply: str = "letter"  # "letter": "B</s>"; "answer-letter": "<option text> B</s>" (the answer, then its letter)
    init_from: str | None = None  # checkpoint.pt whose model (+ heads) weights start this run (a new schedule)
    workers: int = 1  # data processes (0 = in the training process)
    threads: int = 1  # torch threads of the training process


# ------------------------------------------------------------------------------------------------ data


def frame_labels(scene: Scene, indices: np.ndarray) -> np.ndarray:
    """(F, 5) int64 targets per decoded frame: counter, large colour, large shape, flash colour+1, flash shape+1."""
    out = np.zeros((len(indices), len(AUX_TARGETS)), np.int64)
    seg_len = scene.segment_len
    for row, t in enumerate(indices):
        k = min(int(t) // seg_len + 1, len(scene.segments))
        colour, shape = scene.segments[k - 1]
        out[row, :3] = (min(k, MAX_COUNTER - 1), COLOUR_IDS[colour], SHAPE_IDS[shape])
        for start, c, s in scene.flashes:
            if start <= t < start + scene.unit:
                out[row, 3:] = (COLOUR_IDS[c] + 1, SHAPE_IDS[s] + 1)
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


def reply_text(sample: VideoQASample, style: str = "letter") -> str:
    """The target reply: "B", or "red B" (the right option's text, then its letter). Option texts are lower-case
    words and digits, so LongVideoBench's parser (first capital A-E) reads the letter."""
    if style == "letter":
        return LETTERS[sample.answer]
    if style == "answer-letter":
        return f"{sample.options[sample.answer]} {LETTERS[sample.answer]}"
    raise ValueError(f"reply style must be 'letter' or 'answer-letter', got {style!r}")


def encode_example(processor, frames: np.ndarray, prompt: str, reply_str: str) -> dict:
    """Prompt + reply ids, reply labels (-100 elsewhere), pixel values: what run_video.py feeds for `prompt`
    (one user turn with the video, through the chat template and processor), then `reply_str` + </s>."""
    text = processor.apply_chat_template(conversation(prompt), add_generation_prompt=True)
    enc = processor(text=text, videos=frames, return_tensors="pt")
    tok = processor.tokenizer
    reply = tok(reply_str, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ids = torch.cat([enc["input_ids"][0], torch.tensor(reply)])
    target = torch.full_like(ids, -100)
    target[-len(reply):] = torch.tensor(reply)
    return dict(input_ids=ids, labels=target, pixel_values_videos=enc["pixel_values_videos"][0])


CAPTION_PROMPT = "Describe the video."


def caption_text(scene: Scene) -> str:
    """What the video shows, in order: the large shape at each counter value, then the flashes."""
    shapes = ", ".join(f"{k} {c} {s}" for k, (c, s) in enumerate(scene.segments, start=1))
    flashes = ", ".join(f"{c} {s}" for _, c, s in scene.flashes)
    return f"{shapes}. Flashes: {flashes}."


def make_caption_example(processor, index: int, cfg: VideoTrainConfig) -> dict:
    """A captioning example (alignment stage, as LLaVA's pre-training): the same video sampling and chat format,
    prompt CAPTION_PROMPT, reply `caption_text` -- a dense signal that ties video tokens to the words for them."""
    scene, _ = make_sample(cfg.seed, "train", index, cfg.synthetic)
    idx = sample_indices(scene.num_frames, cfg.frames)
    ex = encode_example(processor, clip_frames(scene, idx, cfg, index), CAPTION_PROMPT, " " + caption_text(scene))
    return dict(ex, aux=torch.from_numpy(frame_labels(scene, idx)), kind="caption",
                option_pos=torch.zeros(5, dtype=torch.long), answer=-100)


def clip_frames(scene: Scene, idx: np.ndarray, cfg: VideoTrainConfig, index: int, simulate_codec: bool = True
                ) -> np.ndarray:
    """The rendered frames `idx` of the scene, through the simulated codec (seeded by cfg.seed and `index`)."""
    frames = render(scene, cfg.synthetic.size)[idx]
    return yuv420_roundtrip(frames, np.random.default_rng([cfg.seed, 7, index])) if simulate_codec else frames


def evidence_indices(scene: Scene, qa: dict, num_frames: int) -> np.ndarray:
    """`num_frames` frame indices drawn from the evidence only (a curriculum clip): the evidence ranges in time
    order; for flash questions each range is followed by as many frames of the empty slot after it, so separate
    flashes stay separate. The answer is unchanged; finding the moment in a long video is not needed."""
    seq: list[int] = []
    for a, b in sorted(map(tuple, qa["evidence"])):
        seq += range(a, b)
        if qa["kind"] in ("count_event", "first_event"):
            seq += range(b, min(b + scene.unit, scene.num_frames))
    return np.array(seq)[np.linspace(0, len(seq) - 1, num_frames).astype(np.int64)]


def _fading(start: float, end: float, step: int, cfg: VideoTrainConfig) -> float:
    """`start` at step 0, falling linearly to `end` at `easy_until` x steps, then `end`."""
    t = min(1.0, step / max(1, cfg.easy_until * cfg.steps))
    return start + (end - start) * t


def easy_share(step: int, cfg: VideoTrainConfig) -> float:
    """Share of evidence-only clips in a batch at `step`."""
    return _fading(cfg.easy_start, cfg.easy_end, step, cfg)


def caption_share(step: int, cfg: VideoTrainConfig) -> float:
    """Share of captioning examples in a batch at `step`."""
    return _fading(cfg.caption_start, cfg.caption_end, step, cfg)


def make_example(processor, index: int, split: str, cfg: VideoTrainConfig, simulate_codec: bool = True,
                 easy: bool = False) -> dict:
    """One encoded example of `split`, deterministic in (cfg.seed, split, index); `easy`: a curriculum clip of
    the evidence frames instead of the uniform sampling `run_video.py` does."""
    scene, qa = make_sample(cfg.seed, split, index, cfg.synthetic)
    idx = evidence_indices(scene, qa, cfg.frames) if easy else sample_indices(scene.num_frames, cfg.frames)
    sample = qa_sample(qa, f"{split}_{index}")
    ex = encode_example(processor, clip_frames(scene, idx, cfg, index, simulate_codec), lvb_prompt(sample),
                        reply_text(sample, cfg.reply))
    ex["aux"] = torch.from_numpy(frame_labels(scene, idx))
    ex["kind"] = qa["kind"]
    ex["option_pos"] = option_end_positions(ex["input_ids"], processor.tokenizer)
    ex["answer"] = qa["correct_choice"]
    return ex


def option_end_positions(ids: torch.Tensor, tokenizer) -> torch.Tensor:
    """Positions of the newline that ends each option line "X. text\n" (the 3rd to 7th newline of the prompt:
    the chat template puts one after <video>, the LongVideoBench prompt one after the question)."""
    newline = tokenizer.convert_tokens_to_ids("\u010a")  # byte-level BPE's "\n"
    pos = (ids == newline).nonzero().flatten()
    if len(pos) < 7:
        raise ValueError("prompt does not have the LongVideoBench layout (question, 5 option lines)")
    return pos[2:7]


def collate(examples: list[dict], pad_id: int) -> dict:
    """Right-pad the ids (labels with -100); stack pixels and per-frame targets."""
    n = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), n), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), n), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), n), dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, : len(e["input_ids"])] = e["input_ids"]
        labels[i, : len(e["labels"])] = e["labels"]
        mask[i, : len(e["input_ids"])] = 1
    return dict(input_ids=ids, labels=labels, attention_mask=mask,
                pixel_values_videos=torch.stack([e["pixel_values_videos"] for e in examples]),
                aux=torch.stack([e["aux"] for e in examples]), kind=[e["kind"] for e in examples],
                option_pos=torch.stack([e["option_pos"] for e in examples]),
                answer=torch.tensor([e["answer"] for e in examples]))


class TrainStream(torch.utils.data.Dataset):
    """Batch `b` = training examples b*B .. b*B+B-1: a resumed run sees exactly the batches it has not seen."""

    def __init__(self, processor, cfg: VideoTrainConfig, start_batch: int):
        self.processor, self.cfg, self.start = processor, cfg, start_batch

    def __len__(self) -> int:
        return last_step(self.cfg) - self.start

    def __getitem__(self, i: int) -> dict:
        torch.set_num_threads(1)
        b = self.start + i
        easy, caption = easy_share(b, self.cfg), caption_share(b, self.cfg)
        exs = []
        for j in range(self.cfg.batch_size):
            index = b * self.cfg.batch_size + j
            u = np.random.default_rng([self.cfg.seed, 11, index]).random()
            if u < caption:
                exs.append(make_caption_example(self.processor, index, self.cfg))
            else:
                exs.append(make_example(self.processor, index, "train", self.cfg, easy=u < caption + easy))
        return collate(exs, self.processor.tokenizer.pad_token_id)


# ----------------------------------------------------------------------------------------------- model


class AuxHeads(nn.Module):
    """Training-only read-outs: each frame's projected video tokens -> what the frame shows, and the language
    model's state at the end of each option line -> is this the right option (softmax over the 5 options)."""

    def __init__(self, video_dim: int, tokens_per_frame: int, text_dim: int):
        super().__init__()
        self.tokens_per_frame = tokens_per_frame
        self.heads = nn.ModuleList(nn.Linear(video_dim, n) for _, n in AUX_TARGETS)
        self.option = nn.Linear(text_dim, 1)

    def frame_loss(self, video_tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Every video token of a frame must tell the whole frame (so one attention hop in the language model
        finds, e.g., the colour at a counter value); read through a parameter-free layer norm, so the loss
        cannot be lowered by inflating the projector's output."""
        b, f = targets.shape[:2]
        x = F.layer_norm(video_tokens, video_tokens.shape[-1:]).reshape(b, f, self.tokens_per_frame, -1)
        t = targets[:, :, None].expand(-1, -1, self.tokens_per_frame, -1)
        return sum(F.cross_entropy(h(x).flatten(0, 2), t[..., i].flatten()) for i, h in enumerate(self.heads))

    def option_loss(self, hidden: torch.Tensor, option_pos: torch.Tensor, answer: torch.Tensor) -> torch.Tensor:
        states = hidden.gather(1, option_pos[..., None].expand(-1, -1, hidden.shape[-1]))  # (B, 5, D)
        if not bool((answer >= 0).any()):  # only captioning rows
            return states.sum() * 0.0
        return F.cross_entropy(self.option(states).squeeze(-1), answer, ignore_index=-100)


def forward_loss(model, heads: AuxHeads, batch: dict, aux_weight: float) -> tuple[torch.Tensor, dict]:
    """(loss, stats): reply cross-entropy + aux_weight x auxiliary losses; `reply_correct`: per QA row, whether
    the argmax is right at every reply token under teacher forcing -- i.e. greedy decoding gives the reply."""
    inner = model.model
    video = inner.get_video_features(batch["pixel_values_videos"], return_dict=True).pooler_output  # (B, F*T, D)
    embeds = inner.get_input_embeddings()(batch["input_ids"])
    video_mask = (batch["input_ids"] == model.config.video_token_index).unsqueeze(-1).expand_as(embeds)
    embeds = embeds.masked_scatter(video_mask, video.reshape(-1, video.shape[-1]).to(embeds.dtype))
    hidden = inner.language_model(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).last_hidden_state
    labels = batch["labels"]
    pos = (labels[:, 1:] != -100).nonzero(as_tuple=True)  # positions whose next token is a reply token
    logits = model.lm_head(hidden[:, :-1][pos])
    target = labels[:, 1:][pos]
    reply_loss = F.cross_entropy(logits, target)
    aux_loss = torch.zeros(())
    if aux_weight > 0:
        aux_loss = heads.frame_loss(video, batch["aux"]) + heads.option_loss(hidden, batch["option_pos"],
                                                                             batch["answer"])
    wrong = torch.bincount(pos[0][logits.argmax(-1) != target], minlength=labels.shape[0])
    correct = (wrong == 0)[batch["answer"] >= 0].float()  # QA rows only (not captions)
    return reply_loss + aux_weight * aux_loss, dict(reply_loss=reply_loss.item(), aux_loss=float(aux_loss.detach()),
                                                    reply_correct=correct)


# ------------------------------------------------------------------------------------------------ loop


def last_step(cfg: VideoTrainConfig) -> int:
    return min(cfg.steps, cfg.stop_after or cfg.steps)


def lr_at(step: int, cfg: VideoTrainConfig) -> float:
    """Linear warm-up, then cosine decay to min_lr at the last step."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, t)))


@torch.no_grad()
def evaluate_replies(model, heads: AuxHeads, batches: list[dict]) -> dict:
    """Share of rows whose whole reply greedy decoding reproduces (teacher-forced argmax at every reply token),
    overall and per question kind."""
    model.eval()
    hits: dict[str, list[float]] = {}
    for batch in batches:
        _, st = forward_loss(model, heads, batch, 0.0)
        for kind, ok in zip(batch["kind"], st["reply_correct"].tolist()):
            hits.setdefault(kind, []).append(ok)
    model.train()
    every = [x for v in hits.values() for x in v]
    return {"val_acc": sum(every) / len(every), **{f"val_{k}": sum(v) / len(v) for k, v in sorted(hits.items())}}


RUN_ONLY = ("out", "steps", "eval_every", "checkpoint_every", "workers", "threads", "stop_after")  # may change on resume


def _identity(cfg: dict) -> dict:
    """The settings a resumed run must share with the checkpoint (--steps may grow: the schedule stretches)."""
    return {k: v for k, v in json.loads(json.dumps(cfg)).items() if k not in RUN_ONLY}


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def train(cfg: VideoTrainConfig, progress: bool = True) -> Path:
    """Train (resuming from <out>/checkpoint.pt when present); returns <out>/model (save_pretrained form)."""
    from tqdm import tqdm

    torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    model, processor = build_tiny_llava_next_video(cfg.seed, size=cfg.size)
    dim = model.config.text_config.hidden_size
    heads = AuxHeads(dim, tokens_per_frame(processor), dim)
    params = list(model.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    start = 0
    ckpt_path = out / "checkpoint.pt"
    if ckpt_path.is_file():
        ckpt = torch.load(ckpt_path, weights_only=False)
        if _identity(ckpt["config"]) != _identity(asdict(cfg)):
            raise ValueError(f"{ckpt_path} was written with other settings; use another --out or the same flags:\n"
                             f"saved {ckpt['config']}")
        model.load_state_dict(ckpt["model"])
        heads.load_state_dict(ckpt["heads"])
        opt.load_state_dict(ckpt["opt"])
        start = ckpt["step"]
    elif cfg.init_from:
        init = torch.load(cfg.init_from, weights_only=False)
        model.load_state_dict(init["model"])
        heads.load_state_dict(init["heads"])
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=1))
    pad = processor.tokenizer.pad_token_id
    val = [collate([make_example(processor, i, "val", cfg) for i in range(j, min(j + cfg.batch_size, cfg.val_samples))],
                   pad) for j in range(0, cfg.val_samples, cfg.batch_size)]
    loader = torch.utils.data.DataLoader(TrainStream(processor, cfg, start), batch_size=None, shuffle=False,
                                         num_workers=cfg.workers, prefetch_factor=4 if cfg.workers else None)
    model.train()
    bar = tqdm(total=last_step(cfg), initial=start, disable=not progress, desc="train video model")
    step = start
    with open(out / "log.jsonl", "a") as log:
        for batch in loader:
            t0 = time.perf_counter()
            for g in opt.param_groups:
                g["lr"] = lr_at(step, cfg)
            loss, st = forward_loss(model, heads, batch, cfg.aux_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            step += 1
            row = dict(step=step, loss=loss.item(), reply_loss=st["reply_loss"], aux_loss=st["aux_loss"],
                       train_acc=st["reply_correct"].mean().item() if len(st["reply_correct"]) else None,
                       lr=opt.param_groups[0]["lr"],
                       seconds=time.perf_counter() - t0)
            if step % cfg.eval_every == 0 or step == last_step(cfg):
                row.update(evaluate_replies(model, heads, val))
            log.write(json.dumps(row) + "\n")
            log.flush()
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.3f}", acc=f"{row['train_acc'] or 0:.2f}",
                            **({"val": f"{row['val_acc']:.3f}"} if "val_acc" in row else {}))
            if step % cfg.checkpoint_every == 0 or step == last_step(cfg):
                _atomic_save(dict(model=model.state_dict(), heads=heads.state_dict(), opt=opt.state_dict(),
                                  step=step, config=json.loads(json.dumps(asdict(cfg)))), ckpt_path)
    bar.close()
    plot_training_curve(out / "log.jsonl", out / "curve.png")
    final = out / "model"
    model.eval()
    model.save_pretrained(final)
    processor.save_pretrained(final)
    return final


def plot_training_curve(log_path: Path, png: Path) -> Path:
    """Loss (train, smoothed) and exact-reply accuracy (train smoothed, validation) vs step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(x) for x in open(log_path) if x.strip()]
    steps = np.array([r["step"] for r in rows])

    def smooth(v: np.ndarray, w: int = 50) -> np.ndarray:
        c = np.cumsum(np.insert(v, 0, 0.0))
        return np.array([(c[i + 1] - c[max(0, i + 1 - w)]) / (i + 1 - max(0, i + 1 - w)) for i in range(len(v))])

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
    a.plot(steps, smooth(np.array([r["reply_loss"] for r in rows])), label="reply loss")
    a.plot(steps, smooth(np.array([r["aux_loss"] for r in rows])), label="auxiliary loss (frame + option heads)")
    a.set_xlabel("step"), a.set_yscale("log"), a.legend(), a.set_title("training loss (50-step mean)")
    acc = np.array([np.nan if r["train_acc"] is None else r["train_acc"] for r in rows])
    b.plot(steps, smooth(np.nan_to_num(acc, nan=float(np.nanmean(acc)))), label="train (50-step mean)")
    ev = [r for r in rows if "val_acc" in r]
    b.plot([r["step"] for r in ev], [r["val_acc"] for r in ev], "o-", label="validation")
    b.axhline(0.2, color="grey", ls=":", label="chance")
    b.set_xlabel("step"), b.set_ylim(0, 1), b.legend()
    b.set_title("QA replies right at every token (teacher-forced argmax)", fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png
