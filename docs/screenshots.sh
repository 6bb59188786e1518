#!/usr/bin/env bash
# Regenerate the README's MLflow UI screenshots from a small, real clusterlab sweep:
#   docs/mlflow-sweep-runs.png     runs table, parent sweep run expanded to its trial runs
#   docs/mlflow-sweep-heatmap.png  the parent run's heatmap artifact
#   docs/mlflow-compare.png        parallel-coordinates compare view of the trial runs
#
# Needs: the project's venv (.venv), a Chromium (Debian: `apt-get install -y chromium`) and
# Playwright's Python package (installed here into a throwaway venv; it drives the system
# Chromium, so `playwright install` is not needed). About 2 minutes on 2 CPU cores.
#
# Usage: docs/screenshots.sh            (WORK=/tmp/clusterlab-shots PORT=5077 to change)
# An existing $WORK/mlflow.db is reused (delete $WORK to run the sweep again).
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
WORK=${WORK:-/tmp/clusterlab-shots}
PORT=${PORT:-5077}
CHROMIUM=${CHROMIUM:-/usr/lib/chromium/chromium}   # the real binary behind Debian's /usr/bin/chromium
PWVENV=${PWVENV:-/tmp/pwvenv}
export CLUSTERLAB_TRACKING_URI="sqlite:///$WORK/mlflow.db"
mkdir -p "$WORK"
cd "$WORK"   # runs log their artifacts to ./mlruns next to the database

# 1. A 2x2 grid over MIX'EM's push/pull loss weights on the bundled digits, 2 epochs per trial.
if [ ! -f "$WORK/mlflow.db" ]; then
  cat > space.yaml <<'EOF'
name: loss-weights-demo
base: mixem_digits
overrides: {epochs: 2, batch_size: 128, model.cnn_width: 8, optim.warmup_epochs: 0, eval.kmeans_n_init: 3, eval.raw_pixels_baseline: false}
search:
  lambda_3: {grid: [0.0, 0.1]}
  lambda_4: {grid: [0.0, 0.1]}
tune: {metric: val_loss, mode: min, max_concurrent_trials: 2}
resources: {num_workers: 1, cpus_per_worker: 1}
EOF
  "$REPO/.venv/bin/clusterlab" sweep space.yaml storage_path="$WORK/ray" \
    --tag team=vision --note "MIX'EM loss-weight grid on digits (2 epochs)" > sweep.log 2>&1
fi

# 2. The MLflow UI. The runs' artifact_uri is an absolute local path ($WORK/mlruns/...), which
#    the server reads directly: no --artifacts-destination / --default-artifact-root needed.
#    setsid: the server (uvicorn + job-runner children) gets its own process group, stopped at exit.
setsid "$REPO/.venv/bin/mlflow" server --backend-store-uri "$CLUSTERLAB_TRACKING_URI" \
  --host 127.0.0.1 --port "$PORT" > server.log 2>&1 &
SERVER=$!
stop_server() {   # SIGTERM the group; the server needs ~20 s to stop its job runner
  kill -- -"$SERVER" 2>/dev/null || return 0
  for _ in $(seq 30); do kill -0 -- -"$SERVER" 2>/dev/null || return 0; sleep 1; done
  kill -9 -- -"$SERVER" 2>/dev/null || true
}
trap stop_server EXIT
until curl -sf "http://127.0.0.1:$PORT/health" > /dev/null; do sleep 1; done

# 3. Run ids from the tracking store (parent = the run without mlflow.parentRunId).
read -r EXP PARENT HEATMAP KIDS < <("$REPO/.venv/bin/python" - <<'EOF'
import json, os
from mlflow import MlflowClient
c = MlflowClient(os.environ["CLUSTERLAB_TRACKING_URI"])
exp = c.get_experiment_by_name("loss-weights-demo")
runs = c.search_runs([exp.experiment_id])
parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
kids = [r.info.run_id for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
png = next(a.path for a in c.list_artifacts(parent.info.run_id, "heatmap") if a.path.endswith(".png"))
print(exp.experiment_id, parent.info.run_id, png, json.dumps(kids, separators=(",", ":")))
EOF
)

# 4. Screenshots with Playwright driving the system Chromium. The UI opens in "GenAI" mode by
#    default; ?workflowType=machine_learning switches it to "Model training".
[ -x "$PWVENV/bin/python" ] || { python3 -m venv "$PWVENV" && "$PWVENV/bin/pip" install -q playwright; }
"$PWVENV/bin/python" - "$PORT" "$EXP" "$PARENT" "$HEATMAP" "$KIDS" "$REPO/docs" "$CHROMIUM" <<'EOF'
import json, re, sys
from playwright.sync_api import sync_playwright
port, exp, parent, heatmap, kids, out, chromium = sys.argv[1:]
ui, ml = f"http://127.0.0.1:{port}/#", "workflowType=machine_learning"

def settle(pg, url):
    pg.goto(url); pg.wait_for_timeout(6000)                  # let the SPA load its data
    close = pg.get_by_role("button", name="Close")           # the "MLflow Assistant" side panel
    if close.count(): close.first.click(); pg.wait_for_timeout(500)

with sync_playwright() as p:
    browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])

    # a) runs table: User/Version/Description on, empty Dataset/Models off, the searched params
    #    and val_loss added, wide Run Name/Source columns, parent row expanded.
    pg = browser.new_page(viewport={"width": 1800, "height": 1000})
    settle(pg, f"{ui}/experiments/{exp}/runs?{ml}")
    pg.get_by_role("button", name="Toggle sidebar").click()
    pg.get_by_test_id("column-selection-dropdown").filter(has_text="Columns").click(); pg.wait_for_timeout(800)
    node = lambda n: pg.locator(".du-bois-light-tree-title").filter(has_text=re.compile(f"^{re.escape(n)}$")).first
    for n in ["Dataset", "Models", "User", "Version", "Description"]:
        node(n).click(); pg.wait_for_timeout(200)
    for n in ["loss.weights.push", "loss.weights.pull", "val_loss"]:
        pg.get_by_placeholder("Search columns").fill(n); pg.wait_for_timeout(500); node(n).click(); pg.wait_for_timeout(300)
    pg.keyboard.press("Escape"); pg.wait_for_timeout(800)
    for col, dx in [("attributes.`Run Name`", 130), ("attributes.`Source`", 70),
                    ("params.`loss.weights.pull`", 45), ("params.`loss.weights.push`", 45)]:
        r = pg.locator(f'.ag-header-cell[col-id="{col}"] .ag-header-cell-resize').first.bounding_box()
        x, y = r["x"] + 2, r["y"] + r["height"] / 2              # +2: the handle overlaps the next header
        pg.mouse.move(x, y); pg.mouse.down(); pg.mouse.move(x + dx, y, steps=10); pg.mouse.up(); pg.wait_for_timeout(300)
    pg.locator(".ag-row").first.locator("button").first.click(); pg.wait_for_timeout(1500)   # expand parent
    pg.mouse.click(900, 700); pg.wait_for_timeout(500)          # drop the focused-cell outline
    pg.screenshot(path=f"{out}/mlflow-sweep-runs.png", clip={"x": 0, "y": 0, "width": 1800, "height": 390})

    # b) the parent run's heatmap artifact.
    pg = browser.new_page(viewport={"width": 1600, "height": 1000})
    settle(pg, f"{ui}/experiments/{exp}/runs/{parent}/artifacts/{heatmap}?{ml}")
    pg.screenshot(path=f"{out}/mlflow-sweep-heatmap.png", clip={"x": 0, "y": 0, "width": 1600, "height": 700})

    # c) compare view of the trials: parallel coordinates, searched params -> val_loss, accuracy.
    settle(pg, f"{ui}/compare-runs?runs={kids}&experiments={json.dumps([exp])}&{ml}")
    tag = lambda t: pg.locator(".du-bois-light-select-selection-item").filter(
        has=pg.locator(".du-bois-light-select-selection-item-content", has_text=re.compile(f"^{t}$")))
    for t in ["run_name", "lr"]:                                  # the page's own picks
        if tag(t).count(): tag(t).first.locator(".du-bois-light-select-selection-item-remove").click(); pg.wait_for_timeout(500)
    for m in ["val_loss", "kmeans_mixinit_acc"]:
        pg.locator(".du-bois-light-select").nth(1).click(); pg.keyboard.type(m); pg.wait_for_timeout(600)
        pg.locator(".du-bois-light-select-item-option").filter(has_text=re.compile(f"^{m}$")).first.click(); pg.wait_for_timeout(600)
    pg.keyboard.press("Escape"); pg.mouse.click(1200, 80); pg.wait_for_timeout(1500)
    pg.screenshot(path=f"{out}/mlflow-compare.png", clip={"x": 0, "y": 0, "width": 1600, "height": 940})
    browser.close()
EOF
ls -l "$REPO"/docs/mlflow-*.png
