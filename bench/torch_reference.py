#!/usr/bin/env python3
"""The multi-task network of worker/src/model and worker/src/tasks, in PyTorch, for benchmarks
side by side with ours (bench/compare.sh).

Same parameter and buffer names and shapes as our checkpoints' model.safetensors (checked by
tests/torch_reference.rs), same layers, losses (masked sums over global normalisers, fixed
weights 1/1/1), optimizer (SGD or AdamW, weight decay on >= 2-D non-bias tensors only),
warmup + cosine schedule and gradient clipping, read from the same job file (TOML). What
differs on purpose: the inputs are pre-made synthetic batches in memory (no PNG decoding or
augmentation; we decode and augment every step), FCOS targets are assigned in vectorised torch
code (ours: a Rust loop), and losses are read on log steps only (as a PyTorch user writes it).

  torch_reference.py params --config JOB.toml [--set key=value ...]
      prints {"name": [shape...], ...}: the model's state dict (parameters and buffers)
  torch_reference.py train --config JOB.toml [--set ...] --warmup-steps W --steps T
      trains W + T steps and prints one JSON line with images/s over the last T steps
      (world size and rank from WORLD_SIZE / RANK, MASTER_ADDR / MASTER_PORT as torchrun
      sets them: DDP over gloo with train.batch_size per rank)
  torch_reference.py step --config JOB.toml [--set ...] --warmup-steps W --steps T
        [--device cpu|cuda] [--bf16] [--channels-last] [--compile]
      the training step alone (bench/gpu_compare.sh, against `worker bench-step`): --batches
      pre-made batches on the device, W untimed steps, then T timed ones; the clock stops after
      torch.cuda.synchronize(). No host reads inside the step: normalisers stay tensors (clamped
      at 1), detection positives by mask (no nonzero), FCOS targets assigned on the device every
      step (as ours are). --bf16: forward and losses under autocast(bfloat16); --channels-last:
      model and images in channels_last; --compile: torch.compile of forward + targets + losses
      (the backward is compiled through AOTAutograd; the optimizer and clipping run eagerly
      with PyTorch's default foreach kernels). Prints one JSON line with ms_per_step, images_per_s.
  torch_reference.py allreduce --sizes-mib 4,16,64,256 --iterations 5
      one rank of a gloo all_reduce benchmark (RANK, WORLD_SIZE, MASTER_*), rank 0 prints a
      JSON line per size as `worker collective-bench` does
Threads: torch.set_num_threads(--threads, default OMP_NUM_THREADS or the core count).
"""
import argparse
import json
import math
import os
import sys
import time
import tomllib

import torch
import torch.nn as nn
import torch.nn.functional as F

SHAPES = ["circle", "square", "triangle", "cross", "ring"]  # worker/src/data/synthetic.rs
STRIDES = [8, 16, 32]
SIZE_RANGES = [(-1.0, 64.0), (64.0, 128.0), (128.0, math.inf)]
CENTER_RADIUS = 1.5
FOCAL_ALPHA, FOCAL_GAMMA, PRIOR_PROB = 0.25, 2.0, 0.01
IGNORE_INDEX = 255
EPS = 1e-5


# ---------------------------------------------------------------- config (job/src/*.rs defaults)

def load_config(path, overrides):
    with open(path, "rb") as f:
        cfg = tomllib.load(f)
    for item in overrides:
        key, _, value = item.partition("=")
        section, _, name = key.partition(".")
        try:
            value = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            pass  # a bare string
        cfg.setdefault(section, {})[name] = value
    model, data, train, tasks = (cfg.get(k, {}) for k in ("model", "data", "train", "tasks"))
    backbone = model.get("backbone", "resnet18")
    tiny = backbone == "tiny"
    return {
        "backbone": backbone,
        "width": model.get("width", 0) or (8 if tiny else 64),
        "fpn_channels": model.get("fpn_channels", 0) or (32 if tiny else 256),
        "norm": model.get("norm", "batch"),
        "image_size": data.get("image_size", 64),
        "batch_size": train.get("batch_size", 8),
        "optimizer": train.get("optimizer", "sgd"),
        "lr": train.get("lr", 0.01),
        "momentum": train.get("momentum", 0.9),
        "nesterov": train.get("nesterov", False),
        "weight_decay": train.get("weight_decay", 1e-4),
        "betas": tuple(train.get("betas", [0.9, 0.999])),
        "eps": train.get("eps", 1e-8),
        "warmup_steps": train.get("warmup_steps", 0),
        "steps": train.get("steps", 1),
        "min_lr_ratio": train.get("min_lr_ratio", 0.0),
        "clip_grad_norm": train.get("clip_grad_norm", 0.0),
        "log_every_steps": train.get("log_every_steps", 10),
        "tasks": {t: tasks.get(t, True) for t in ("classification", "detection", "segmentation")},
    }


# ---------------------------------------------------------------- model (worker/src/model)

def group_count(channels):
    groups = 32
    while groups > 1 and channels % groups:
        groups //= 2
    return groups


class BatchNorm(nn.BatchNorm2d):
    """BatchNorm2d without `num_batches_tracked` (our checkpoints have none; momentum is fixed)."""

    def __init__(self, channels, gamma=1.0):
        super().__init__(channels, eps=EPS, momentum=0.1)
        self.num_batches_tracked = None
        nn.init.constant_(self.weight, gamma)


def norm_layer(kind, channels, gamma=1.0):
    if kind in ("batch", "sync_batch"):
        return BatchNorm(channels, gamma)
    if kind == "group":
        gn = nn.GroupNorm(group_count(channels), channels, eps=EPS)
        nn.init.constant_(gn.weight, gamma)
        return gn
    raise SystemExit(f"model.norm = {kind!r} is not replicated (batch, sync_batch, group)")


def conv(c_in, c_out, k, stride):
    c = nn.Conv2d(c_in, c_out, k, stride, k // 2, bias=False)
    nn.init.kaiming_normal_(c.weight, mode="fan_out", nonlinearity="relu")
    return c


class Block(nn.Module):
    def __init__(self, norm, bottleneck, c_in, planes, stride):
        super().__init__()
        if bottleneck:
            c_out, shapes = planes * 4, [(c_in, planes, 1, 1), (planes, planes, 3, stride), (planes, planes * 4, 1, 1)]
        else:
            c_out, shapes = planes, [(c_in, planes, 3, stride), (planes, planes, 3, 1)]
        self.n = len(shapes)
        for i, (ci, co, k, s) in enumerate(shapes, 1):
            setattr(self, f"conv{i}", conv(ci, co, k, s))
            setattr(self, f"bn{i}", norm_layer(norm, co, 0.0 if i == self.n else 1.0))
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(conv(c_in, c_out, 1, stride), norm_layer(norm, c_out))

    def forward(self, x):
        y = x
        for i in range(1, self.n + 1):
            y = getattr(self, f"bn{i}")(getattr(self, f"conv{i}")(y))
            if i < self.n:
                y = F.relu(y)
        identity = self.downsample(x) if self.downsample is not None else x
        return F.relu(y + identity)


class Backbone(nn.Module):
    LAYOUT = {"tiny": (False, [1, 1, 1, 1]), "resnet18": (False, [2, 2, 2, 2]),
              "resnet34": (False, [3, 4, 6, 3]), "resnet50": (True, [3, 4, 6, 3])}

    def __init__(self, kind, width, norm):
        super().__init__()
        bottleneck, blocks = self.LAYOUT[kind]
        expansion = 4 if bottleneck else 1
        self.conv1 = conv(3, width, 7, 2)
        self.bn1 = norm_layer(norm, width)
        c_in = width
        for i, n in enumerate(blocks):
            planes = width << i
            stage = []
            for j in range(n):
                stage.append(Block(norm, bottleneck, c_in, planes, 2 if i > 0 and j == 0 else 1))
                c_in = planes * expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*stage))
        self.out_channels = [2 * width * expansion, 4 * width * expansion, 8 * width * expansion]

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        x = self.layer1(x)
        c3 = self.layer2(x)
        c4 = self.layer3(c3)
        return c3, c4, self.layer4(c4)


def biased_conv(c_in, c_out, k, bias=0.0, std=None):
    c = nn.Conv2d(c_in, c_out, k, 1, k // 2)
    if std is not None:
        nn.init.normal_(c.weight, 0.0, std)
    nn.init.constant_(c.bias, bias)
    return c


class Fpn(nn.Module):
    def __init__(self, in_channels, channels):
        super().__init__()
        self.lateral = nn.ModuleList(biased_conv(c, channels, 1) for c in in_channels)
        self.output = nn.ModuleList(biased_conv(channels, channels, 3) for _ in range(3))

    def forward(self, c):
        top = self.lateral[2](c[2])
        merged = [top]
        for i in (1, 0):
            lat = self.lateral[i](c[i])
            top = lat + F.interpolate(top, size=lat.shape[-2:], mode="nearest")
            merged.append(top)
        merged.reverse()
        return [self.output[i](m) for i, m in enumerate(merged)]


class ClassificationHead(nn.Module):
    def __init__(self, c5, classes):
        super().__init__()
        self.fc = nn.Linear(c5, classes)

    def forward(self, c5):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(c5, 1), 1))


def tower(channels):
    layers = []
    for _ in range(4):
        layers += [biased_conv(channels, channels, 3, std=0.01), nn.GroupNorm(group_count(channels), channels, eps=EPS)]
    return nn.Sequential(*layers)


def run_tower(t, x):
    for i in range(0, len(t), 2):
        x = F.relu(t[i + 1](t[i](x)))
    return x


class DetectionHead(nn.Module):
    def __init__(self, channels, classes):
        super().__init__()
        self.cls_tower = tower(channels)
        self.box_tower = tower(channels)
        self.cls_logits = biased_conv(channels, classes, 3, -math.log((1 - PRIOR_PROB) / PRIOR_PROB), 0.01)
        self.bbox_pred = biased_conv(channels, 4, 3, 0.0, 0.01)
        self.centerness = biased_conv(channels, 1, 3, 0.0, 0.01)
        self.scales = nn.Parameter(torch.ones(3))

    def forward(self, features):
        cls, ltrb, ctr = [], [], []
        for level, x in enumerate(features):
            cls.append(self.cls_logits(run_tower(self.cls_tower, x)))
            b = run_tower(self.box_tower, x)
            ltrb.append(F.relu(self.bbox_pred(b) * self.scales[level]) * STRIDES[level])
            ctr.append(self.centerness(b))
        return cls, ltrb, ctr


class SegmentationHead(nn.Module):
    def __init__(self, channels, classes):
        super().__init__()
        self.fuse = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.fuse_norm = nn.GroupNorm(group_count(channels), channels, eps=EPS)
        self.classifier = nn.Conv2d(channels, classes, 1)

    def forward(self, p, image_hw):
        h, w = p[0].shape[-2:]
        fused = p[0]
        for x in p[1:]:
            fused = fused + F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
        logits = self.classifier(F.relu(self.fuse_norm(self.fuse(fused))))
        return F.interpolate(logits, size=image_hw, mode="bilinear", align_corners=False)


class MultiTaskModel(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        tasks, channels = cfg["tasks"], cfg["fpn_channels"]
        self.backbone = Backbone(cfg["backbone"], cfg["width"], cfg["norm"])
        self.neck = Fpn(self.backbone.out_channels, channels) if tasks["detection"] or tasks["segmentation"] else None
        heads = {}
        if tasks["classification"]:
            heads["classification"] = ClassificationHead(self.backbone.out_channels[2], len(SHAPES))
        if tasks["detection"]:
            heads["detection"] = DetectionHead(channels, len(SHAPES))
        if tasks["segmentation"]:
            heads["segmentation"] = SegmentationHead(channels, len(SHAPES) + 1)
        self.heads = nn.ModuleDict(heads)

    def forward(self, images):
        c = self.backbone(images)
        p = self.neck(c) if self.neck is not None else None
        out = {}
        if "classification" in self.heads:
            out["cls"] = self.heads["classification"](c[2])
        if "detection" in self.heads:
            out["det"] = self.heads["detection"](p)
        if "segmentation" in self.heads:
            out["seg"] = self.heads["segmentation"](p, images.shape[-2:])
        return out


# ---------------------------------------------------------------- targets and losses (worker/src/tasks)

def feature_sizes(size):
    out, n = [], size
    for level in range(5):
        n = (n + 1) // 2
        if level >= 2:
            out.append(n)
    return out


def locations(size):
    xs, ss, ranges = [], [], []
    for n, stride, (lo, hi) in zip(feature_sizes(size), STRIDES, SIZE_RANGES):
        c = torch.arange(n, dtype=torch.float32) * stride + stride / 2
        y, x = torch.meshgrid(c, c, indexing="ij")
        xs.append(torch.stack([x.reshape(-1), y.reshape(-1)], 1))
        ss.append(torch.full((n * n,), float(stride)))
        ranges.append(torch.tensor([[lo, hi]]).expand(n * n, 2))
    return torch.cat(xs), torch.cat(ss), torch.cat(ranges)


def fcos_targets(boxes, valid, locs):
    """FCOS assignment of fcos_targets.rs, vectorised: boxes [B,M,5] (x1,y1,x2,y2,class), valid
    [B,M]; returns labels [B,N] (-1 = negative) and ltrb [B,N,4]."""
    xy, s, ranges = locs
    x, y = xy[None, :, None, 0], xy[None, :, None, 1]
    b = boxes[:, None, :, :]
    d = torch.stack([x - b[..., 0], y - b[..., 1], b[..., 2] - x, b[..., 3] - y], -1)  # [B,N,M,4]
    cx, cy = (b[..., 0] + b[..., 2]) / 2, (b[..., 1] + b[..., 3]) / 2
    r = (CENTER_RADIUS * s)[None, :, None]
    inside = ((x - torch.maximum(cx - r, b[..., 0]) > 0) & (y - torch.maximum(cy - r, b[..., 1]) > 0)
              & (torch.minimum(cx + r, b[..., 2]) - x > 0) & (torch.minimum(cy + r, b[..., 3]) - y > 0))
    max_d = d.max(-1).values
    ok = inside & (max_d > ranges[None, :, None, 0]) & (max_d <= ranges[None, :, None, 1]) & valid[:, None, :]
    area = ((b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])).expand_as(max_d)
    area = torch.where(ok, area, torch.full_like(area, math.inf))
    best = area.argmin(-1)  # first of equal areas, as the Rust loop keeps the first
    pos = ok.any(-1)
    cls = torch.gather(boxes[..., 4], 1, best).long()
    labels = torch.where(pos, cls, torch.full_like(cls, -1))
    ltrb = torch.gather(d, 2, best[..., None, None].expand(-1, -1, 1, 4)).squeeze(2) * pos[..., None]
    return labels, ltrb


def flatten_levels(levels):
    return torch.cat([t.permute(0, 2, 3, 1).reshape(t.shape[0], -1, t.shape[1]) for t in levels], 1)


def giou_loss(p, t, eps=1e-7):
    inter = (torch.minimum(p[:, 0], t[:, 0]) + torch.minimum(p[:, 2], t[:, 2])) * \
            (torch.minimum(p[:, 1], t[:, 1]) + torch.minimum(p[:, 3], t[:, 3]))
    area = lambda v: (v[:, 0] + v[:, 2]) * (v[:, 1] + v[:, 3])
    union = area(p) + area(t) - inter
    enclosing = (torch.maximum(p[:, 0], t[:, 0]) + torch.maximum(p[:, 2], t[:, 2])) * \
                (torch.maximum(p[:, 1], t[:, 1]) + torch.maximum(p[:, 3], t[:, 3]))
    return 1 - (inter / (union + eps) - (enclosing - union) / (enclosing + eps))


def detection_loss(out, labels, ltrb_t, labelled, normaliser):
    cls = flatten_levels(out[0])
    b, n, c = cls.shape
    positive = labels >= 0
    onehot = F.one_hot(labels.clamp_min(0), c).float() * positive[..., None]
    p = torch.sigmoid(cls)
    ce = F.binary_cross_entropy_with_logits(cls, onehot, reduction="none")
    p_t = p * onehot + (1 - p) * (1 - onehot)
    alpha_t = onehot * FOCAL_ALPHA + (1 - onehot) * (1 - FOCAL_ALPHA)
    focal = (ce * (1 - p_t) ** FOCAL_GAMMA * alpha_t * labelled.float().view(b, 1, 1)).sum()
    pos = positive.view(-1).nonzero().squeeze(1)
    pred = flatten_levels(out[1]).reshape(b * n, 4).index_select(0, pos)
    target = ltrb_t.reshape(b * n, 4).index_select(0, pos)
    giou = giou_loss(pred, target).sum()
    ctr_t = torch.sqrt(torch.minimum(target[:, 0], target[:, 2]) / torch.maximum(target[:, 0], target[:, 2])
                       * torch.minimum(target[:, 1], target[:, 3]) / torch.maximum(target[:, 1], target[:, 3]))
    ctr = F.binary_cross_entropy_with_logits(flatten_levels(out[2]).reshape(b * n).index_select(0, pos), ctr_t,
                                             reduction="sum")
    return (focal + giou + ctr) / max(normaliser, 1.0)


def detection_loss_masked(out, labels, ltrb_t, normaliser):
    """detection_loss without host reads: positives by mask, the normaliser a tensor."""
    cls = flatten_levels(out[0])
    b, n, c = cls.shape
    positive = labels >= 0
    pos = positive.float()
    onehot = F.one_hot(labels.clamp_min(0), c).float() * pos[..., None]
    p = torch.sigmoid(cls)
    ce = F.binary_cross_entropy_with_logits(cls, onehot, reduction="none")
    p_t = p * onehot + (1 - p) * (1 - onehot)
    alpha_t = onehot * FOCAL_ALPHA + (1 - onehot) * (1 - FOCAL_ALPHA)
    focal = (ce * (1 - p_t) ** FOCAL_GAMMA * alpha_t).sum()
    pred = flatten_levels(out[1]).reshape(b * n, 4)
    # Negatives get a harmless unit target (their terms are masked out below).
    target = torch.where(positive.reshape(b * n, 1), ltrb_t.reshape(b * n, 4), torch.ones_like(pred))
    mask = pos.reshape(b * n)
    giou = (giou_loss(pred, target) * mask).sum()
    ctr_t = torch.sqrt(torch.minimum(target[:, 0], target[:, 2]) / torch.maximum(target[:, 0], target[:, 2])
                       * torch.minimum(target[:, 1], target[:, 3]) / torch.maximum(target[:, 1], target[:, 3]))
    ctr = (F.binary_cross_entropy_with_logits(flatten_levels(out[2]).reshape(b * n), ctr_t, reduction="none")
           * mask).sum()
    return (focal + giou + ctr) / normaliser


# ---------------------------------------------------------------- inputs

def synthetic_batches(cfg, batch, count, seed):
    """`count` batches like the shapes dataset's: 1-3 boxes per image (the first large), masks
    painting each box with its class + 1, every task labelled."""
    g = torch.Generator().manual_seed(seed)
    size = cfg["image_size"]
    out = []
    for _ in range(count):
        images = torch.randn(batch, 3, size, size, generator=g)
        masks = torch.zeros(batch, size, size, dtype=torch.long)
        boxes = torch.zeros(batch, 3, 5)
        valid = torch.zeros(batch, 3, dtype=torch.bool)
        for i in range(batch):
            k = int(torch.randint(1, 4, (1,), generator=g))
            for j in range(k):
                lo, hi = (0.18, 0.32) if j == 0 else (0.08, 0.22)
                r = size * (lo + (hi - lo) * float(torch.rand(1, generator=g)))
                cx, cy = (r + (size - 2 * r) * torch.rand(2, generator=g)).tolist()
                cls = int(torch.randint(0, len(SHAPES), (1,), generator=g))
                x1, y1, x2, y2 = cx - r, cy - r, cx + r, cy + r
                boxes[i, j] = torch.tensor([x1, y1, x2, y2, cls])
                valid[i, j] = True
                masks[i, int(y1):int(y2), int(x1):int(x2)] = cls + 1
        classes = boxes[:, 0, 4].long()
        out.append((images, classes, boxes, valid, masks))
    return out


# ---------------------------------------------------------------- training (worker/src/train)

def lr_at(cfg, step):
    if step < cfg["warmup_steps"]:
        return cfg["lr"] * (step + 1) / cfg["warmup_steps"]
    decay = max(cfg["steps"] - cfg["warmup_steps"], 1)
    progress = min((step - cfg["warmup_steps"]) / decay, 1.0)
    lo = cfg["min_lr_ratio"] * cfg["lr"]
    return lo + (cfg["lr"] - lo) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(cfg, model):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.dim() >= 2 and not name.endswith("bias") else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg["optimizer"] == "adamw":
        return torch.optim.AdamW(groups, lr=cfg["lr"], betas=cfg["betas"], eps=cfg["eps"])
    return torch.optim.SGD(groups, lr=cfg["lr"], momentum=cfg["momentum"], nesterov=cfg["nesterov"])


def train(args, cfg):
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        import torch.distributed as dist
        dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(args.seed)
    model = MultiTaskModel(cfg)
    net = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(model, find_unused_parameters=False)
    optimizer = make_optimizer(cfg, model)
    batch = cfg["batch_size"]
    batches = synthetic_batches(cfg, batch, args.batches, args.seed + 1 + rank)
    locs = locations(cfg["image_size"])
    tasks = cfg["tasks"]
    total = args.warmup_steps + args.steps
    start = None
    for step in range(total):
        if step == args.warmup_steps:
            if world > 1:
                dist.barrier()
            start = time.perf_counter()
        images, classes, boxes, valid, masks = batches[step % len(batches)]
        for group in optimizer.param_groups:
            group["lr"] = lr_at(cfg, step)
        optimizer.zero_grad()
        labels, ltrb = fcos_targets(boxes, valid, locs) if tasks["detection"] else (None, None)
        # Normalisers summed over ranks before any loss divides by them (as ours: losses.rs).
        counts = torch.tensor([float(batch), float((labels >= 0).sum()) if labels is not None else 0.0,
                               float((masks != IGNORE_INDEX).sum())])
        if world > 1:
            dist.all_reduce(counts)
        n_cls, n_pos, n_pix = counts.tolist()
        out = net(images)
        losses = {}
        if "cls" in out:
            losses["classification"] = F.cross_entropy(out["cls"], classes, reduction="sum") / max(n_cls, 1.0)
        if "det" in out:
            losses["detection"] = detection_loss(out["det"], labels, ltrb, torch.ones(batch, dtype=torch.bool), n_pos)
        if "seg" in out:
            losses["segmentation"] = F.cross_entropy(out["seg"], masks, reduction="sum",
                                                     ignore_index=IGNORE_INDEX) / max(n_pix, 1.0)
        # Each rank's loss times the world size: DDP's mean of gradients is then the gradient of
        # the global batch's loss (the global normalisers above).
        (sum(losses.values()) * world).backward()
        if cfg["clip_grad_norm"] > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["clip_grad_norm"])
        optimizer.step()
        if (step + 1) % cfg["log_every_steps"] == 0 and rank == 0 and args.verbose:
            print(json.dumps({"step": step + 1, **{k: v.item() for k, v in losses.items()}}), file=sys.stderr)
    seconds = time.perf_counter() - start
    if rank == 0:
        print(json.dumps({"images_per_s": args.steps * batch * world / seconds, "seconds": seconds,
                          "steps": args.steps, "batch_per_rank": batch, "world_size": world,
                          "threads": torch.get_num_threads()}), flush=True)
    if world > 1:
        dist.destroy_process_group()


def step_bench(args, cfg):
    """The training step alone on device-resident batches (see the module docstring)."""
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(args.seed)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    model = MultiTaskModel(cfg).to(device, memory_format=fmt)
    optimizer = make_optimizer(cfg, model)
    batch, tasks = cfg["batch_size"], cfg["tasks"]
    batches = [tuple(t.to(device) for t in b) for b in synthetic_batches(cfg, batch, args.batches, args.seed + 1)]
    batches = [(images.contiguous(memory_format=fmt), *rest) for images, *rest in batches]
    locs = tuple(t.to(device) for t in locations(cfg["image_size"]))

    def forward_and_losses(images, classes, boxes, valid, masks):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            out = model(images)
            losses = []
            if "cls" in out:
                losses.append(F.cross_entropy(out["cls"].float(), classes, reduction="sum") / batch)
            if "det" in out:
                labels, ltrb = fcos_targets(boxes, valid, locs)
                n_pos = (labels >= 0).sum().float().clamp_min(1.0)
                losses.append(detection_loss_masked([[t.float() for t in level] for level in out["det"]],
                                                    labels, ltrb, n_pos))
            if "seg" in out:
                n_pix = (masks != IGNORE_INDEX).sum().float().clamp_min(1.0)
                losses.append(F.cross_entropy(out["seg"].float(), masks, reduction="sum",
                                              ignore_index=IGNORE_INDEX) / n_pix)
            return torch.stack(losses)

    compute = torch.compile(forward_and_losses, mode=args.compile_mode) if args.compile else forward_and_losses
    params = [p for p in model.parameters()]

    def one_step(i):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(cfg, i)
        optimizer.zero_grad(set_to_none=True)
        losses = compute(*batches[i % len(batches)])
        losses.sum().backward()
        if cfg["clip_grad_norm"] > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg["clip_grad_norm"], foreach=device.type == "cuda" or None)
        optimizer.step()
        return losses

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for i in range(args.warmup_steps):
        one_step(i)
    sync()
    start = time.perf_counter()
    for i in range(args.warmup_steps, args.warmup_steps + args.steps):
        losses = one_step(i)
    sync()
    seconds = time.perf_counter() - start
    if not torch.isfinite(losses).all():
        raise SystemExit(f"the last step's losses are not finite: {losses.tolist()}")
    print(json.dumps({"ms_per_step": seconds * 1000 / args.steps, "images_per_s": args.steps * batch / seconds,
                      "batch_size": batch, "image_size": cfg["image_size"], "steps": args.steps,
                      "warmup": args.warmup_steps, "device": str(device), "bf16": args.bf16,
                      "channels_last": args.channels_last, "compile": args.compile,
                      "threads": torch.get_num_threads()}), flush=True)


def allreduce(args):
    import torch.distributed as dist
    dist.init_process_group("gloo")
    rank, n = dist.get_rank(), dist.get_world_size()
    for mib in args.sizes_mib:
        size = mib * 1024 * 1024
        data = torch.ones(size // 4)
        dist.all_reduce(data)  # warm-up
        dist.barrier()
        start = time.perf_counter()
        for _ in range(args.iterations):
            dist.all_reduce(data)
        seconds = (time.perf_counter() - start) / args.iterations
        if rank == 0:
            algbw = size / seconds / 1e9
            print(json.dumps({"world_size": n, "size_bytes": size, "seconds": seconds, "algbw_gbs": algbw,
                              "busbw_gbs": algbw * 2 * (n - 1) / n}), flush=True)
    dist.destroy_process_group()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["params", "train", "step", "allreduce"])
    ap.add_argument("--config", help="the job file (TOML)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "0") or 0))
    ap.add_argument("--warmup-steps", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batches", type=int, default=8, help="distinct pre-made batches, cycled")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("--sizes-mib", type=lambda s: [int(x) for x in s.split(",")], default=[4, 16, 64, 256])
    ap.add_argument("--iterations", type=int, default=5)
    ap.add_argument("--device", default="cpu", help="step: cpu, cuda or cuda:N")
    ap.add_argument("--bf16", action="store_true", help="step: forward and losses under bf16 autocast")
    ap.add_argument("--channels-last", action="store_true", help="step: model and images channels_last")
    ap.add_argument("--compile", action="store_true", help="step: torch.compile forward, targets and losses")
    ap.add_argument("--compile-mode", default=None, help="step: torch.compile's mode (default: its default)")
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.command == "allreduce":
        return allreduce(args)
    if not args.config:
        raise SystemExit("--config is required")
    cfg = load_config(args.config, args.set)
    if args.command == "params":
        model = MultiTaskModel(cfg)
        print(json.dumps({k: list(v.shape) for k, v in model.state_dict().items()}))
    elif args.command == "step":
        step_bench(args, cfg)
    else:
        train(args, cfg)


if __name__ == "__main__":
    main()
