// Screenshot of the page with one streamed answer in it:
//   node tests/e2e/screenshot.mjs http://127.0.0.1:8000/ out.png [phone|desktop]
import { launch, PHONE, DESKTOP } from './browser.mjs';

const [base = 'http://127.0.0.1:8000/', out = 'page.png', form = 'desktop'] = process.argv.slice(2);
const browser = await launch();
try {
  const context = await browser.newContext(form === 'phone' ? PHONE : DESKTOP);
  await context.addInitScript(() => localStorage.setItem('dac.org', 'org_screenshot'));
  const page = await context.newPage();
  page.setDefaultTimeout(30_000);
  await page.goto(base);
  await page.fill('#model', 'mock:ttft=50,itl=10,n=60');
  await page.fill('#composer-input', 'What does the gateway do with `identical` requests?\n\n<b>not bold</b>');
  await page.press('#composer-input', 'Enter');
  await page.waitForSelector('#messages article.assistant[data-status="complete"]');
  await page.screenshot({ path: out });
  console.log(out);
} finally {
  await browser.close();
}
