"""The worklist page in a real browser (Debian's headless chromium through Selenium), fed by the real broker
through a real `WorklistService`: what a radiologist sees must follow Kafka without a reload."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from selenium import webdriver
from selenium.common.exceptions import (
    ElementClickInterceptedException,
    NoSuchElementException,
    StaleElementReferenceException,
)
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.chrome.webdriver import WebDriver
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

from streaming.contracts import Reference, Source, build_dead_letter, build_result, rfc3339
from streaming.errors import ErrorCode, FetchError
from streaming.settings import Settings
from worklist.service import WorklistService

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.browser]

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
WAIT_S = 20.0
MODEL = {"name": "pneumonia-xception", "version": "0.3.0"}
RETRIED = (StaleElementReferenceException, NoSuchElementException, ElementClickInterceptedException)


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.exists()]
    if missing:
        pytest.fail(
            f"{' and '.join(missing)} not found: the page tests need Debian's chromium and chromium-driver;"
            " `make system-deps` installs them"
        )
    options = Options()
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(argument)
    options.add_argument("--window-size=1280,900")
    options.binary_location = str(CHROMIUM)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    driver.set_page_load_timeout(WAIT_S)
    driver.set_script_timeout(WAIT_S)
    yield driver
    driver.quit()


@pytest.fixture
def start_worklist(
    tmp_path: Path, kafka_broker: Any, topics: dict[str, str], sample_dir: Path
) -> Iterator[Callable[..., WorklistService]]:
    """`start_worklist(**settings)`: a running service on fresh topics and a fresh database."""
    services: list[WorklistService] = []

    def start(**overrides: Any) -> WorklistService:
        settings = Settings.load(
            kafka_bootstrap_servers=kafka_broker.bootstrap_servers,
            worklist_db=tmp_path / "worklist.db",
            worklist_port=0,
            allowed_roots=[sample_dir],
            **topics,
            **overrides,
        )
        service = WorklistService(settings).start()
        services.append(service)
        return service

    yield start
    for service in services:
        service.app.state.events.close()  # the page's event stream ends, so the server stops at once
        service.stop()


def result(study_uid: str, priority: str, pneumonia: float, *, ago_s: float = 0.0) -> str:
    sent = datetime.now(UTC) - timedelta(seconds=ago_s)
    ref = Reference(event_id=f"ev-{study_uid}", uri="file:///nowhere/x.jpeg", study_uid=study_uid)
    body = build_result(
        ref,
        model=MODEL,
        scores={"NORMAL": 1 - pneumonia, "PNEUMONIA": pneumonia},
        top_finding="PNEUMONIA" if pneumonia >= 0.5 else None,
        priority=priority,
        sent_at=sent,
        scored_at=datetime.now(UTC),
    )
    return json.dumps(body)


def dead_letter(study_uid: str, reason: str) -> str:
    ref = Reference(
        event_id=f"ev-{study_uid}",
        uri="file:///nowhere/y.jpeg",
        study_uid=study_uid,
        sent_at=rfc3339(datetime.now(UTC)),
    )
    body = build_dead_letter(
        FetchError(ErrorCode.FORBIDDEN_URI, reason),
        payload=ref.to_json(),
        source=Source("cxr.references", 0, 7),
        event_id=ref.event_id,
        failed_at=datetime.now(UTC),
    )
    return json.dumps(body)


def rows(driver: WebDriver) -> list[dict[str, str]]:
    """The queue as the page shows it, read in one go (no stale elements)."""
    script = """return [...document.querySelectorAll('#queue-body tr')].map(r => ({
        key: r.dataset.key, priority: r.dataset.priority, overdue: r.dataset.overdue,
        tag: getComputedStyle(r.querySelector('.overdue-tag')).display}))"""
    return list(driver.execute_script(script))


def wait_for(driver: WebDriver, what: str, check: Callable[[WebDriver], Any], timeout_s: float = WAIT_S) -> Any:
    return WebDriverWait(driver, timeout_s, poll_frequency=0.2, ignored_exceptions=RETRIED).until(check, what)


def rows_when(check: Callable[[list[dict[str, str]]], bool]) -> Callable[[WebDriver], list[dict[str, str]] | None]:
    def shown(driver: WebDriver) -> list[dict[str, str]] | None:
        now = rows(driver)
        return now if check(now) else None

    return shown


def clicked(selector: str) -> Callable[[WebDriver], bool]:
    """A wait condition that clicks what `selector` finds (tried again if a re-render replaced it)."""

    def click(driver: WebDriver) -> bool:
        driver.find_element(By.CSS_SELECTOR, selector).click()
        return True

    return click


def console_errors(driver: WebDriver) -> list[str]:
    """What the page logged as errors, but for the thumbnail a test study has none of (a 404 by design)."""
    return [
        e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE" and "thumbnail" not in e["message"]
    ]


def open_page(driver: WebDriver, service: WorklistService) -> None:
    # The browser outlives each test's service: leave the last page (still polling a server that has stopped)
    # and forget what it logged, so each test sees only its own page's errors.
    driver.get("about:blank")
    driver.get_log("browser")
    driver.get(service.url)
    wait_for(driver, "the live stream", lambda d: d.find_element(By.ID, "live").get_attribute("data-state") == "live")
    driver.execute_script("window.__sameDocument = true")  # gone if the page reloads


def test_results_appear_in_order_without_a_reload_and_reading_one_removes_it(
    browser: WebDriver, start_worklist: Callable[..., WorklistService], produce: Any, topics: dict[str, str]
) -> None:
    service = start_worklist()
    open_page(browser, service)
    assert rows(browser) == []

    # published least urgent first: the page must reorder them
    produce(
        topics["results_topic"],
        [result("1.2.3.1", "ROUTINE", 0.1), result("1.2.3.2", "URGENT", 0.7), result("1.2.3.3", "STAT", 0.96)],
        keys=["1.2.3.1", "1.2.3.2", "1.2.3.3"],
    )
    shown = wait_for(browser, "three studies", rows_when(lambda r: len(r) == 3))
    assert [(r["key"], r["priority"]) for r in shown] == [
        ("1.2.3.3", "STAT"),
        ("1.2.3.2", "URGENT"),
        ("1.2.3.1", "ROUTINE"),
    ]
    assert all(r["overdue"] == "false" and r["tag"] == "none" for r in shown)

    # by keyboard: j moves down, Enter opens the details (the image is not reachable: no thumbnail shown)
    wait_for(browser, "the first row", clicked('tr[data-key="1.2.3.3"]'))
    browser.switch_to.active_element.send_keys("j")
    assert browser.switch_to.active_element.get_attribute("data-key") == "1.2.3.2"
    browser.switch_to.active_element.send_keys(Keys.ENTER)
    wait_for(browser, "the details", lambda d: "1.2.3.2" in d.find_element(By.ID, "details-fields").text)
    wait_for(
        browser,
        "the thumbnail to stay hidden",
        lambda d: d.execute_script(
            "const i = document.getElementById('thumbnail');"
            " return i.src.includes('/thumbnail') && i.complete && i.hidden"
        ),
    )

    wait_for(browser, "the read button", clicked('tr[data-key="1.2.3.3"] button[data-action="read"]'))
    wait_for(browser, "the read study to leave", lambda d: [r["key"] for r in rows(d)] == ["1.2.3.2", "1.2.3.1"])
    assert service.store.study("1.2.3.3", datetime.now(UTC))["status"] == "read"

    # an image that could not be scored: its reason in the panel, its study on the queue, unscored
    reason = "The file is outside the allowed roots."
    produce(topics["dead_letter_topic"], [dead_letter("1.2.3.4", reason)], keys=["ev-1.2.3.4"])
    letter = wait_for(
        browser,
        "the dead letter",
        lambda d: d.find_element(By.CSS_SELECTOR, '#dead-letters-list li[data-error="forbidden_uri"]').text,
    )
    assert reason in letter and "fetch/forbidden_uri" in letter
    wait_for(
        browser, "the unscored study", lambda d: [r["priority"] for r in rows(d)] == ["URGENT", "UNSCORED", "ROUTINE"]
    )
    assert browser.execute_script("return window.__sameDocument === true")
    assert console_errors(browser) == []


def test_an_overdue_study_rises_above_more_urgent_ones(
    browser: WebDriver, start_worklist: Callable[..., WorklistService], produce: Any, topics: dict[str, str]
) -> None:
    cap_s = 6.0
    service = start_worklist(worklist_max_wait_routine_s=cap_s)
    open_page(browser, service)
    produce(
        topics["results_topic"],
        [result("2.1", "STAT", 0.95), result("2.2", "URGENT", 0.6), result("2.3", "ROUTINE", 0.2, ago_s=1.0)],
        keys=["2.1", "2.2", "2.3"],
    )
    shown = wait_for(browser, "three studies", rows_when(lambda r: len(r) == 3))
    arrived = time.monotonic()
    assert [r["key"] for r in shown] == ["2.1", "2.2", "2.3"] and shown[2]["overdue"] == "false"

    # escalated above everything but STAT
    risen = wait_for(browser, "the overdue study to rise", rows_when(lambda r: r[1]["key"] == "2.3"))
    assert time.monotonic() - arrived < cap_s + 5  # it rose by itself, soon after its cap
    assert [r["key"] for r in risen] == ["2.1", "2.3", "2.2"]
    assert risen[1]["overdue"] == "true" and risen[1]["tag"] != "none"  # marked, in words as well as colour
    assert [risen[0]["overdue"], risen[2]["overdue"]] == ["false", "false"]
    assert browser.execute_script("return window.__sameDocument === true")
    assert console_errors(browser) == []
