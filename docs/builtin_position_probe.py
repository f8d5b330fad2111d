"""How linearly the image tokens the decoder receives encode their own grid cell: R^2 of a least-squares
probe (column, row) on the shipped model's projector outputs, 100 val images, 80/20 split.

    python docs/builtin_position_probe.py
"""
import sys, numpy as np, torch
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
from vlmc.eval import shapes_vqa as S
from vlmc.models_zoo import load
torch.set_num_threads(1)
lm = load("shapes-llava"); m = lm.model
items = list(S.items("val", 300))
X, col, row = [], [], []
with torch.no_grad():
    for it in items[:100]:
        e = m.encode_image(m.normalize(torch.from_numpy(it.image.transpose(2, 0, 1).copy())))[0]
        X.append(e.numpy()); col.append(np.arange(196) % 14); row.append(np.arange(196) // 14)
X = np.concatenate(X); col = np.concatenate(col); row = np.concatenate(row)
def r2(X, y):
    n = len(y); tr = slice(0, n * 4 // 5); te = slice(n * 4 // 5, n)
    A = np.c_[X, np.ones(len(X))]
    w = np.linalg.lstsq(A[tr], y[tr], rcond=None)[0]
    p = A[te] @ w; return 1 - ((p - y[te]) ** 2).sum() / ((y[te] - y[te].mean()) ** 2).sum()
print("projector out: R2 col", r2(X, col), "row", r2(X, row))
