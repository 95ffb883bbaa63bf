"""Screenshots of each tab of `clip2gan serve` (headless chromium) for the README: docs/serve_<tab>.png.

    PYTHONPATH=tests python bench/serve_screenshots.py [--out docs]   (the browser helpers live in tests/)

Needs selenium (`.[browser]`) and Debian's chromium + chromium-driver.
"""
from __future__ import annotations

import argparse
import shutil
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    args = parser.parse_args()

    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    from clip2gan_cli.packs import load_pack
    from clip2gan_cli.serve.app import ModelSpec, ServeApp, make_workdir
    from clip2gan_cli.serve.server import make_server
    from test_serve_browser import generate, open_page, start_browser, wait_for

    app = ServeApp(models=load_pack("shapes", device="cpu"), spec=ModelSpec(), workdir=make_workdir())
    server = make_server(app, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    driver = start_browser()
    driver.set_window_size(1100, 820)
    tab = lambda name: driver.find_element(By.CSS_SELECTOR, f'nav button[data-tab="{name}"]').click()  # noqa: E731
    settle = lambda: time.sleep(0.5)  # noqa: E731  images decoded and painted
    try:
        open_page(driver, base)
        generate(driver, "a red circle\na blue square on a white background", 6, 0)
        settle()
        driver.save_screenshot(str(args.out / "serve_generate.png"))
        driver.find_elements(By.CSS_SELECTOR, "figure.generated button.send")[0].click()
        wait_for(lambda: "/files/" in (driver.find_element(By.ID, "edit-edited").get_attribute("src") or ""))
        driver.find_elements(By.CSS_SELECTOR, ".edit-beta")[0].send_keys(*[Keys.ARROW_RIGHT] * 15)
        wait_for(lambda: driver.find_element(By.ID, "tab-edit").get_attribute("data-busy") == "")
        settle()
        driver.save_screenshot(str(args.out / "serve_edit.png"))
        tab("interpolate")
        driver.find_element(By.ID, "interp-frames").clear()
        driver.find_element(By.ID, "interp-frames").send_keys("10")
        driver.find_element(By.ID, "interp-run").click()
        wait_for(lambda: len(driver.find_elements(By.CSS_SELECTOR, "figure.frame img")) == 10)
        settle()
        driver.save_screenshot(str(args.out / "serve_interpolate.png"))
        tab("model")
        settle()
        driver.save_screenshot(str(args.out / "serve_model.png"))
    finally:
        driver.quit()
        server.shutdown()
        shutil.rmtree(app.workdir, ignore_errors=True)
    print("\n".join(str(args.out / f"serve_{name}.png") for name in ("generate", "edit", "interpolate", "model")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
