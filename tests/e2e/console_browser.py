"""Drives the review console in headless Chromium (WebDriver): signs in
through the test's OIDC provider, approves one pending request by clicking
its button, and screenshots each page. Prints a JSON result."""
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
    out["ok"] = True
except Exception as e:  # reported to the test with where the browser was
    out["error"] = repr(e)
    out["url"] = driver.current_url
    out["page"] = driver.page_source[:3000]
finally:
    driver.quit()
print(json.dumps(out))
