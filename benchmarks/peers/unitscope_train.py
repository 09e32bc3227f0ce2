"""unitscope's own trainer, run as a user runs it: `Trainer` over an on-disk store."""
import json
import sys
from pathlib import Path

from common import finish

from unitscope import Store
from unitscope.dictionaries.train import TrainConfig, Trainer

work, n, k, batch, steps, lr = sys.argv[1], *map(int, sys.argv[2:6]), float(sys.argv[6])
dtype = sys.argv[7] if len(sys.argv) > 7 else "float32"  # the default run (auto) is named by what it picks
work = Path(work)
store = Store.open(work / "store")
name = "unitscope" if dtype == "float32" else f"unitscope-{dtype}"
cfg = TrainConfig(n_units=n, k=k, batch_size=batch, train_tokens=batch * steps, lr=lr, compute_dtype=dtype,
                  checkpoint_every=10**9)
t = Trainer(store, store.sites[0], cfg, work / f"{name}.dict", progress=False)
sae = t.run()
summary = json.loads((work / f"{name}.dict" / "train.json").read_text())
finish(work, name, summary["seconds"], summary["tokens"],
       {"W_enc": sae.W_enc, "b_enc": sae.b_enc, "W_dec": sae.W_dec, "b_dec": sae.b_dec})
