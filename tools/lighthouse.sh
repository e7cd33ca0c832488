#!/usr/bin/env bash
# Lighthouse (mobile) against a running gateway, with Debian's Chromium:
#   tools/lighthouse.sh [URL]          default http://127.0.0.1:8000/
# Prints the category scores and the page's LCP and CLS, and keeps the full
# JSON report in $LIGHTHOUSE_OUT (default /tmp/lighthouse.json).
# Needs `npm ci` (lighthouse 12.2.3 from package-lock.json) and /usr/bin/chromium.
set -euo pipefail
cd "$(dirname "$0")/.."

url="${1:-http://127.0.0.1:8000/}"
out="${LIGHTHOUSE_OUT:-/tmp/lighthouse.json}"
export CHROME_PATH="${CHROME_PATH:-/usr/bin/chromium}"

[[ -x node_modules/.bin/lighthouse ]] || { echo "lighthouse is not installed: run 'npm ci'" >&2; exit 2; }
[[ -x "$CHROME_PATH" ]] || { echo "no Chromium at $CHROME_PATH: apt-get install -y chromium" >&2; exit 2; }

node_modules/.bin/lighthouse "$url" \
  --quiet \
  --form-factor=mobile \
  --only-categories=performance,accessibility,best-practices,seo \
  --chrome-flags="--headless --no-sandbox --disable-gpu --disable-background-networking --disable-component-update --disable-sync --no-first-run" \
  --output=json --output-path="$out"

node --input-type=module - "$out" <<'JS'
import { readFileSync } from 'node:fs';
const report = JSON.parse(readFileSync(process.argv[2], 'utf8'));
const score = (id) => Math.round((report.categories[id]?.score ?? 0) * 100);
const audit = (id) => report.audits[id]?.displayValue ?? 'n/a';
console.log(`Lighthouse ${report.lighthouseVersion} (${report.configSettings.formFactor}) ${report.finalDisplayedUrl}`);
console.log(`Performance     ${score('performance')}`);
console.log(`Accessibility   ${score('accessibility')}`);
console.log(`Best practices  ${score('best-practices')}`);
console.log(`SEO             ${score('seo')}`);
console.log(`LCP ${audit('largest-contentful-paint')}   CLS ${audit('cumulative-layout-shift')}   TBT ${audit('total-blocking-time')}   FCP ${audit('first-contentful-paint')}`);
const failed = Object.values(report.categories.accessibility.auditRefs)
  .map((ref) => report.audits[ref.id])
  .filter((a) => a.score !== null && a.score < 1 && a.scoreDisplayMode === 'binary');
for (const a of failed) console.log(`  accessibility: ${a.id}: ${a.title}`);
JS
