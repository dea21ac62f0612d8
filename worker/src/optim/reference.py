import torch
torch.set_printoptions(precision=8)
W0 = [[0.1, -0.2, 0.3], [0.4, 0.5, -0.6]]; B0 = [0.01, -0.02]
GW = [[0.5, -1.0, 0.25], [0.1, 0.2, -0.3]]; GB = [0.3, -0.7]
SCALES = [1.0, -0.5, 2.0]; LRS = [0.1, 0.05, 0.02]
def run(make):
    w = torch.tensor(W0, requires_grad=True); b = torch.tensor(B0, requires_grad=True)
    opt = make([{"params": [w]}, {"params": [b], "weight_decay": 0.0}])
    for s, lr in zip(SCALES, LRS):
        for g in opt.param_groups: g["lr"] = lr
        w.grad = torch.tensor(GW) * s; b.grad = torch.tensor(GB) * s
        opt.step()
    print(w.detach().flatten().tolist(), b.detach().tolist())
run(lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.1))
run(lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.1))
run(lambda p: torch.optim.AdamW(p, lr=0.1, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1))
# schedule
p = torch.zeros(1, requires_grad=True); opt = torch.optim.SGD([p], lr=0.1)
sched = torch.optim.lr_scheduler.SequentialLR(opt, [
    torch.optim.lr_scheduler.LinearLR(opt, start_factor=1/3, end_factor=1.0, total_iters=2),
    torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=7, eta_min=0.01)], milestones=[3])
lrs = []
for _ in range(10):
    lrs.append(opt.param_groups[0]["lr"]); opt.step(); sched.step()
print(lrs)
# clip
a = torch.zeros(2, 3, requires_grad=True); c = torch.zeros(4, requires_grad=True)
a.grad = torch.tensor([[3.0, -4.0, 1.0], [0.5, 2.0, -1.5]]); c.grad = torch.tensor([1.0, -2.0, 0.25, 0.0])
n = torch.nn.utils.clip_grad_norm_([a, c], 2.0)
print(n.item(), a.grad.flatten().tolist(), c.grad.tolist())
