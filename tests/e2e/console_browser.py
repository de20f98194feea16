"""Drives the review console in headless Chromium (WebDriver): signs in
through the test's OIDC provider, approves one pending request by clicking
its button, replays an SSH recording in the asciinema player (reading the
player's terminal text once it has played), and screenshots each page.
Prints a JSON result."""
import json
import os
import sys

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import WebDriverWait

args = json.loads(sys.argv[1])
opts = webdriver.ChromeOptions()
opts.binary_location = "/usr/bin/chromium"
for flag in [
    "--headless=new", "--no-sandbox", "--disable-gpu",
    "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
    # The console's leaf comes from the daemon's test CA, which this fresh
    # profile does not trust; curl in the other tests checks it properly.
    "--ignore-certificate-errors",
    "--user-data-dir=" + args["profile"], "--window-size=1280,900",
]:
    opts.add_argument(flag)
out = {"ok": False}
driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
try:
    wait = WebDriverWait(driver, 30)
    driver.get(args["url"] + "/requests")
    wait.until(ec.title_contains("Requests"))
    out["signed_in_as"] = driver.find_element(By.CSS_SELECTOR, "header .who").text
    driver.save_screenshot(os.path.join(args["shots"], "requests.png"))
    card = driver.find_element(By.ID, "req-" + args["request"])
    out["command_shown"] = card.find_element(By.CSS_SELECTOR, "pre.command").text
    card.find_element(By.CSS_SELECTOR, "button.approve").click()
    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "p.ok")))
    out["after"] = driver.find_element(By.CSS_SELECTOR, "p.ok").text
    driver.save_screenshot(os.path.join(args["shots"], "requests-decided.png"))
    for page in ["sessions", "grants", "audit"]:
        driver.get(args["url"] + "/" + page)
        driver.save_screenshot(os.path.join(args["shots"], page + ".png"))
    out["audit_chain"] = driver.find_element(By.ID, "chain").text
    if args.get("replay"):
        driver.get(args["url"] + "/sessions/" + args["replay"])
        wait.until(ec.title_contains("Session"))
        # The player's own terminal (not the text fallback below it).
        term = "div.player .ap-term"
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, term)))
        marker = args["marker"]
        read = ("var e=document.querySelector(arguments[0]);"
                "return e?e.textContent:'';")
        wait.until(lambda d: marker in d.execute_script(read, term))
        out["player_text"] = driver.execute_script(read, term)
        out["player_version"] = driver.execute_script(
            "return typeof AsciinemaPlayer==='object'&&!!AsciinemaPlayer.create;")
        driver.save_screenshot(os.path.join(args["shots"], "replay-ssh.png"))
        # Whatever the page logged (a CSP refusal would show here).
        try:
            out["console_log"] = [e["message"] for e in driver.get_log("browser")]
        except Exception:  # not every driver keeps the log
            out["console_log"] = []
    out["ok"] = True
except Exception as e:  # reported to the test with where the browser was
    out["error"] = repr(e)
    out["url"] = driver.current_url
    out["page"] = driver.page_source[:3000]
finally:
    driver.quit()
print(json.dumps(out))
