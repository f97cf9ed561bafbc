// Drives a running JupyterLab in headless Chromium (Playwright, system Chromium), for
// tests/test_browser.py:
//   open a notebook, run all its cells, find the guidance-scale slider, record the plot next to
//   it, move the slider with the keyboard, wait for the plot to change, save screenshots.
// Prints one JSON line on stdout with what it saw; exits 1 with a message saying which step
// failed and why (a cell's error text when the notebook fails to execute).
//
//   node drive_lab.js --url http://127.0.0.1:PORT --token TOKEN --notebook notebooks/02_toy_2d_energy.py \
//                     --out ARTIFACT_DIR [--slider "guidance"] [--timeout 90]
'use strict';
const fs = require('fs');
const path = require('path');
const crypto = require('crypto');
const { chromium } = require('playwright-core');

function parseArgs(argv) {
  const a = { slider: 'guidance', timeout: 90, chromium: process.env.AEPO_CHROMIUM || '/usr/bin/chromium' };
  for (let i = 2; i < argv.length; i += 2) a[argv[i].replace(/^--/, '')] = argv[i + 1];
  for (const k of ['url', 'token', 'notebook', 'out']) if (!a[k]) throw new Error(`missing --${k}`);
  a.timeout = Number(a.timeout) * 1000;
  return a;
}

const t0 = Date.now();
const log = (msg) => process.stderr.write(`[drive_lab ${((Date.now() - t0) / 1000).toFixed(1)}s] ${msg}\n`);
const sha = (buf) => crypto.createHash('sha256').update(buf).digest('hex').slice(0, 16);
class StepError extends Error {}

async function step(name, fn) {
  log(name);
  try { return await fn(); } catch (e) {
    if (e instanceof StepError) throw e;
    throw new StepError(`step "${name}" failed: ${e.message.split('\n')[0]}`);
  }
}

// Text of every error output in the notebook (with the code cell's position), or []. JupyterLab
// renders an error as stderr text holding the traceback; a warning has no traceback.
async function cellErrors(page) {
  return page.$$eval('.jp-Notebook .jp-Cell.jp-CodeCell', (cells) => cells.flatMap((cell, i) => {
    const outs = [...cell.querySelectorAll('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]')];
    const isError = (t) => /Traceback \(most recent call last\)/.test(t)
      || /^[A-Za-z_][\w.]*(Error|Exception|Exit)\b.*$/.test(t.trim().split('\n').pop());
    return outs.filter((e) => isError(e.innerText))
      .map((e) => ({ cell: i, text: e.innerText.trim().split('\n').slice(-12).join('\n') }));
  }));
}

async function main() {
  const args = parseArgs(process.argv);
  fs.mkdirSync(args.out, { recursive: true });
  const result = { notebook: args.notebook, screenshots: [] };
  const browser = await step('launch chromium', () => chromium.launch({
    executablePath: args.chromium, headless: true, chromiumSandbox: false,
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
           '--disable-component-update', '--disable-sync', '--disable-dev-shm-usage'],
  }));
  const page = await browser.newPage({ viewport: { width: 1400, height: 1000 } });
  page.setDefaultTimeout(args.timeout);
  const shot = async (name, locator) => {
    const file = path.join(args.out, name);
    await (locator || page).screenshot({ path: file });
    result.screenshots.push(file);
    return fs.readFileSync(file);
  };
  try {
    // A fresh workspace (reset) so nothing from earlier sessions is restored.
    const nbUrl = `${args.url}/lab/tree/${args.notebook}?reset&token=${args.token}`;
    await step(`open ${args.notebook}`, async () => {
      await page.goto(nbUrl, { waitUntil: 'domcontentloaded' });
      await page.locator('.jp-NotebookPanel .jp-Notebook .jp-Cell').first().waitFor();
    });
    result.opened_as_notebook = true;
    // A notebook without kernelspec metadata asks which kernel to start: accept the default.
    await step('wait for the kernel', async () => {
      const deadline = Date.now() + args.timeout;
      const kernelName = page.locator('.jp-NotebookPanel-toolbar .jp-KernelName').first();
      const status = page.locator('.jp-StatusBar-Widget');
      for (;;) {
        const dialog = page.locator('.jp-Dialog', { hasText: 'Select Kernel' });
        if (await dialog.count()) {
          result.kernel_dialog = true;
          await dialog.locator('.jp-Dialog-button.jp-mod-accept').click();
        } else if (await kernelName.count() && !/No Kernel/i.test(await kernelName.innerText())
                   && /\|\s*Idle/.test(await status.innerText())) {
          result.kernel = (await kernelName.innerText()).trim();
          break;
        }
        if (Date.now() > deadline) throw new Error(`no idle kernel after ${args.timeout / 1000} s`);
        await page.waitForTimeout(250);
      }
    });
    await step('run all cells (Run menu)', async () => {
      await page.locator('.lm-MenuBar-item', { hasText: /^Run$/ }).click();
      await page.locator('.lm-Menu-item:has(.lm-Menu-itemLabel:text-is("Run All Cells"))').click();
    });
    const tRun = Date.now();
    // Done when no prompt shows [*] and the kernel is idle, or as soon as an error appears.
    await step('wait for the cells to finish', async () => {
      const deadline = Date.now() + args.timeout;
      for (;;) {
        const state = await page.evaluate(() => {
          const prompts = [...document.querySelectorAll('.jp-Notebook .jp-CodeCell .jp-InputArea-prompt')].map((p) => p.innerText.trim());
          return { running: prompts.filter((p) => p.includes('*')).length, done: prompts.filter((p) => /\[\d+\]/.test(p)).length, n: prompts.length };
        });
        const errors = await cellErrors(page);
        if (errors.length) {
          await shot('error.png');
          throw new StepError(`notebook ${args.notebook} failed to execute: code cell ${errors[0].cell + 1} raised:\n${errors[0].text}`);
        }
        if (state.running === 0 && state.done > 0 && Date.now() - tRun > 1500) {
          result.cells_executed = state.done;
          const late = await cellErrors(page);
          if (late.length) {
            await shot('error.png');
            throw new StepError(`notebook ${args.notebook} failed to execute: code cell ${late[0].cell + 1} raised:\n${late[0].text}`);
          }
          break;
        }
        if (Date.now() > deadline) throw new Error(`cells still running after ${args.timeout / 1000} s (${state.done}/${state.n} done)`);
        await page.waitForTimeout(500);
      }
    });
    result.run_s = (Date.now() - tRun) / 1000;

    // The slider: an ipywidgets slider whose description matches --slider.
    const re = new RegExp(args.slider, 'i');
    const sliders = page.locator('.widget-slider', { has: page.locator('.widget-label', { hasText: re }) });
    const slider = sliders.first();
    await step(`find the slider labelled /${args.slider}/i`, () => slider.waitFor());
    // The code cell holding the slider; the images in its output are "the plot".
    const cell = page.locator('.jp-Notebook .jp-CodeCell').filter({ has: sliders }).first();
    const output = cell.locator('.jp-Cell-outputArea').first();
    await slider.scrollIntoViewIfNeeded();
    const readout = slider.locator('.widget-readout');
    const plotState = async () => {
      const srcs = await output.locator('img').evaluateAll((imgs) => imgs.map((i) => i.currentSrc || i.src));
      const text = await readout.count() ? (await readout.first().innerText()).trim() : null;
      return { images: srcs.map((s) => sha(s)), readout: text };
    };
    const waitForImage = async () => {
      await output.locator('img').first().waitFor();
      await page.waitForTimeout(300);
    };
    // A notebook may draw its plot only when the slider moves (the static figure above it shows
    // the start). Then a first move draws plot A, and the move below must change A into B.
    if (!(await output.locator('img').count())) {
      await step('first slider move (the plot is drawn on a move)', async () => {
        const handle = slider.locator('.noUi-handle').first();
        await handle.focus();
        await handle.press('ArrowLeft');
      });
    }
    await step('wait for the plot next to the slider', waitForImage);
    const before = await plotState();
    result.before = before;
    await shot('before.png');
    await shot('before-output.png', cell);
    await step('move the slider (keyboard, right arrow)', async () => {
      const handle = slider.locator('.noUi-handle').first();
      await handle.focus();
      await handle.press('ArrowRight');
      await handle.press('ArrowRight');
    });
    let after = before;
    await step('wait for the plot to change', async () => {
      const deadline = Date.now() + 30000;
      for (;;) {
        await page.waitForTimeout(300);
        if (await output.locator('img').count()) {
          after = await plotState();
          if (after.images.length && after.images.join() !== before.images.join()) break;
        }
        if (Date.now() > deadline) {
          throw new Error(`the plot did not change within 30 s (readout ${before.readout} -> ${after.readout})`);
        }
      }
    });
    await page.waitForTimeout(300);
    after = await plotState();
    result.after = after;
    result.changed = after.images.join() !== before.images.join();
    const errors = await cellErrors(page);
    if (errors.length) throw new StepError(`moving the slider raised in code cell ${errors[0].cell + 1}:\n${errors[0].text}`);
    await slider.scrollIntoViewIfNeeded();
    await shot('after.png');
    await shot('after-output.png', cell);
    result.total_s = (Date.now() - t0) / 1000;
    process.stdout.write(JSON.stringify(result) + '\n');
  } catch (e) {
    try { await shot('failure.png'); } catch (_) { /* the page may be gone */ }
    throw e;
  } finally {
    await browser.close();
  }
}

main().catch((e) => {
  process.stderr.write(`drive_lab: ${e instanceof StepError ? '' : 'error: '}${e.message}\n`);
  process.exit(1);
});
