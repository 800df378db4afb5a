"""Compare the claim verdicts of two sets of executed notebooks (e.g. an old commit's reports and today's): parse the
'[VERDICT] claim -- detail' lines lab.experiments.claim prints. usage: python bench/compare_verdicts.py OLD_DIR NEW_DIR PROFILE"""
import json
import re
import sys
from pathlib import Path

LINE = re.compile(r"^\[(HOLDS AT THIS SCALE|DOES NOT HOLD AT THIS SCALE|NOT TESTABLE AT THIS SCALE)\] (.*?)(?: -- (.*))?$")


def verdicts(ipynb):
    nb = json.loads(Path(ipynb).read_text())
    out = {}
    for c in nb["cells"]:
        for o in c.get("outputs", []):
            text = "".join(o.get("text", "")) if o.get("output_type") == "stream" else ""
            for line in text.splitlines():
                m = LINE.match(line.strip())
                if m:
                    out[m.group(2)] = (m.group(1).split(" AT ")[0].lower(), m.group(3) or "")
    return out


def key(c):   # claims whose text carries a number from the run: compare on the text before the first '('
    return re.sub(r"\s+", " ", c.split(" (")[0]).strip()


if len(sys.argv) != 4:
    raise SystemExit(__doc__)
old_dir, new_dir, profile = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
for new in sorted(new_dir.glob(f"*-{profile}.ipynb")):
    old = old_dir / new.name
    if not old.exists():
        print(f"## {new.stem}: no old report"); continue
    o, n = verdicts(old), verdicts(new)
    ok, nk = {key(c): (c, v) for c, v in o.items()}, {key(c): (c, v) for c, v in n.items()}
    print(f"## {new.stem}: old {len(o)} claims ({sum(v[0]=='holds' for v in o.values())} hold), "
          f"new {len(n)} ({sum(v[0]=='holds' for v in n.values())} hold)")
    for k in sorted(set(ok) | set(nk)):
        ov = ok.get(k, (None, ("-", "")))[1]; nv = nk.get(k, (None, ("-", "")))[1]
        if ov[0] != nv[0]:
            print(f"- {k}\n    old: {ov[0]} -- {ov[1]}\n    new: {nv[0]} -- {nv[1]}")
