"""report.html in a real browser: Debian's chromium, driven by selenium through chromium-driver.

`open_page` loads a page from disk and returns what a reader of it sees, measured by the browser
in one pass: every source row (its labels, the lines of code in each column, where they are drawn),
the tables of differences and their links, the plots' drawn lines, the page's width, and every
network request the browser made while loading it (Chrome's performance log) with every message
it logged (a Content-Security-Policy violation is one).
"""

import json
import shutil

# A laptop's screen.
WIDTH, HEIGHT = 1366, 900


def start_chromium():
    """Headless chromium at a laptop's size, logging network events and console messages. Fails,
    saying what to install, where chromium or its driver is missing: no test skips for want of it.
    selenium is imported here, not with the module, so that test_compare's other tests still run
    where it is not installed (.ci/gpu deselects the browser's tests there, by their marker)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    assert browser and driver, ("the page tests need Debian's chromium and chromium-driver: "
                                "sudo apt-get install -y chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    # --no-sandbox: CI runs as root, where chromium's sandbox refuses to start.
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     f"--window-size={WIDTH},{HEIGHT}", "--hide-scrollbars"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    return webdriver.Chrome(options=options, service=Service(driver))


# What a reader sees, gathered in the page in one pass (layout is computed once).
MEASURE = """
const rect = element => { const r = element.getBoundingClientRect();
                          return {x: r.left + scrollX, y: r.top + scrollY, width: r.width, height: r.height}; };
const text = element => element ? element.innerText.trim() : null;
const column = (row, index) => [...row.querySelectorAll('table.code tr')].map(tr => {
    const cells = tr.children;
    const number = cells[2 * index], source = cells[2 * index + 1];
    if (!source || source.classList.contains('empty')) return null;
    return {number: Number(number.innerText), text: source.textContent, own: !source.classList.contains('from-twin'),
            rect: rect(source), overflows: source.scrollWidth > source.clientWidth + 1};
});
return {
  width: document.documentElement.scrollWidth, viewport: innerWidth,
  views: [...document.querySelectorAll('.pair')].map(view => ({
    id: view.id, single: view.classList.contains('single'),
    heads: [...view.querySelectorAll('.pair-head > div')].map(text),
    rows: [...view.querySelectorAll(':scope > .def')].map(row => ({
      id: row.id, status: [...row.classList].find(name => name.startsWith('status-')).slice(7),
      left: text(row.querySelector('.label .left .name')), right: text(row.querySelector('.label .right .name')),
      notes: [...row.querySelectorAll('.label .note')].map(text), why: text(row.querySelector('.label .why')),
      lines: [column(row, 0), column(row, 1)],
      rect: rect(row), overflows: row.scrollWidth > row.clientWidth + 1,
    })),
  })),
  tables: [...document.querySelectorAll('table.differences')].map(table => ({
    section: table.closest('section').id,
    rows: [...table.querySelectorAll('tr[id]')].map(tr => ({
      id: tr.id, topic: text(tr.children[0]),
      places: [...tr.querySelectorAll('td.places li')].map(li => ({
        name: text(li.querySelector('code')),
        links: [...li.querySelectorAll('a')].map(a => {
          const target = document.getElementById(a.getAttribute('href').slice(1));
          return {href: a.getAttribute('href'), target: target && {
            id: target.id, isDefinition: target.classList.contains('def'), rect: rect(target),
            names: [...target.querySelectorAll('.label .name')].map(text)}};
        }),
      })),
    })),
  })),
  plots: [...document.querySelectorAll('.plot')].map(plot => {
    const svg = plot.querySelector('svg');
    // matplotlib draws each data line (and each legend handle) as a path 1.5 wide.
    const lines = [...svg.querySelectorAll('g[id*="line2d"] > path')].filter(
        path => (path.getAttribute('style') || '').includes('stroke-width: 1.5'));
    return {id: plot.id, rect: rect(svg), lines: lines.map(path => {
        const box = path.getBBox(); return {width: box.width, height: box.height, rect: rect(path)}; })};
  }),
  summary: [...document.querySelectorAll('#summary tr')].map(tr => [...tr.children].map(text)),
  configuration: Object.fromEntries([...document.querySelectorAll('#configuration tr')].map(
      tr => [text(tr.children[0]), text(tr.children[1])])),
  problems: text(document.getElementById('problems')),
  missingPlaces: text(document.getElementById('missing-places')),
  hasResults: !!document.getElementById('results'),
};
"""


def drain_logs(driver):
    for kind in ("performance", "browser"):
        driver.get_log(kind)


def requests_made(driver):
    """The URL of every request the browser sent since the logs were last read."""
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


def open_page(driver, path):
    """Load a page from disk; (what the reader sees, the URLs requested, the console's messages)."""
    drain_logs(driver)
    driver.get(path.resolve().as_uri())
    seen = driver.execute_script(MEASURE)
    return seen, requests_made(driver), [entry["message"] for entry in driver.get_log("browser")]
