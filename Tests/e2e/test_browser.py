"""A real browser (Debian's headless Chromium) loads the page, submits the form and shows the answer."""
import shutil

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import WebDriverWait

CHROMEDRIVER = shutil.which("chromedriver")
CHROMIUM = shutil.which("chromium")


@pytest.fixture
def browser():
    if not (CHROMEDRIVER and CHROMIUM):
        pytest.fail("chromium and chromium-driver are required (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def test_page_sends_form_input_and_shows_both_sides(server, browser):
    browser.get(server.http + "/")
    wait = WebDriverWait(browser, 15)
    wait.until(EC.text_to_be_present_in_element((By.ID, "status"), "connected"))
    box = browser.find_element(By.ID, "message")
    box.send_keys("hello from chromium")
    box.submit()
    wait.until(EC.text_to_be_present_in_element((By.ID, "messages"), "Message received: hello from chromium"))
    client = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#messages li.client")]
    server_side = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#messages li.server")]
    assert client == ["hello from chromium"]
    assert "Message received: hello from chromium" in server_side
    assert box.get_attribute("value") == ""  # the form was reset, as in the reference
    # With the 0.5 s idle interval, the time push shows up too.
    wait.until(EC.text_to_be_present_in_element((By.ID, "messages"), "It is: "))
