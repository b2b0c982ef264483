"""The default page passes its own query string on to the socket: /?room=blue reaches a room."""
from pathlib import Path

from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import WebDriverWait

from test_browser import browser  # noqa: F401  (the headless Chromium fixture)

ROOT = Path(__file__).resolve().parents[2]
ROOM = 'return { on_open = function(conn) conn:send("room: " .. tostring(conn.query.room)) end }\n'


def test_page_query_reaches_the_socket(tmp_path, start_server, browser):  # noqa: F811
    (tmp_path / "room.lua").write_text(ROOM)
    server = start_server("--scripts", str(tmp_path), "--public", str(ROOT / "public"))
    wait = WebDriverWait(browser, 15)

    browser.get(server.http + "/?room=blue")
    wait.until(EC.text_to_be_present_in_element((By.ID, "messages"), "room: "))
    assert [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#messages li.server")] == ["room: blue"]

    # Without a query the socket URL is plain /ws, as before.
    browser.get(server.http + "/")
    wait.until(EC.text_to_be_present_in_element((By.ID, "messages"), "room: "))
    assert [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#messages li.server")] == ["room: nil"]
