// Drives a running JupyterLab in headless Chromium (Playwright, system Chromium), for
// tests/test_browser.py:
//   open a notebook, run all its cells, record for every cell with a slider whether its plot is
//   there before any slider moves, find the guidance-scale slider, record the plot next to it,
//   move the slider with the keyboard, wait for the plot to change, save screenshots, and
//   (--save 1) save the notebook the way Ctrl-S does.
// Prints one JSON line on stdout with what it saw; exits 1 with a message saying which step
// failed and why (which code cell raised, and its error, when the notebook fails to execute).
//
// Execution state is read from the notebook *model* (window.jupyterapp), never from the page's
// text: JupyterLab 4 renders only the cells near the viewport (windowing), so an error in an
// off-screen cell has no text in the DOM. The driver turns on JupyterLab's own
// exposeAppInBrowser page option for its page (the server is not reconfigured).
//
//   node drive_lab.js --url http://127.0.0.1:PORT --token TOKEN --notebook notebooks/02_toy_2d_energy.py \
//                     --out ARTIFACT_DIR [--slider "guidance"] [--timeout 90] [--save 0|1]
'use strict';
const fs = require('fs');
const path = require('path');
const crypto = require('crypto');
const { chromium } = require('playwright-core');

function parseArgs(argv) {
  const a = { slider: 'guidance', timeout: 90, save: '0', chromium: process.env.AEPO_CHROMIUM || '/usr/bin/chromium' };
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

// The notebook's execution state, from its model (every cell, on screen or not):
//   { found, kernel, dirty, codeCells, toRun, executed, running, errors: [{cell, first, ename, evalue, traceback}] }
// cell: the 1-based position among code cells; first: the cell's first non-blank source line.
async function notebookState(page, notebook) {
  return page.evaluate((nbPath) => {
    const app = window.jupyterapp;
    if (!app) return { found: false, why: 'window.jupyterapp is not set (exposeAppInBrowser)' };
    const panel = [...app.shell.widgets('main')].find((w) => w.context && w.content && w.content.model
      && (w.context.path === nbPath || w.context.path.endsWith('/' + nbPath)));
    if (!panel) return { found: false, why: `no open notebook ${nbPath}` };
    const strip = (t) => String(t).replace(/\u001b\[[0-9;]*m/g, '');
    const st = { found: true, codeCells: 0, toRun: 0, executed: 0, running: 0, errors: [],
                 kernel: panel.sessionContext.session?.kernel?.status ?? 'none',
                 dirty: panel.context.model.dirty };
    for (const cell of panel.content.model.cells) {
      if (cell.type !== 'code') continue;
      st.codeCells += 1;
      const source = cell.sharedModel.getSource();
      if (source.trim()) st.toRun += 1;  // an empty code cell is never executed
      if (source.trim() && cell.executionCount !== null) st.executed += 1;
      if (cell.executionState === 'running') st.running += 1;
      for (const o of cell.outputs.toJSON()) {
        if (o.output_type !== 'error') continue;
        st.errors.push({ cell: st.codeCells, first: (source.split('\n').find((l) => l.trim()) || '').trim().slice(0, 60),
                         ename: o.ename, evalue: strip(o.evalue),
                         traceback: (o.traceback || []).map(strip).join('\n').trim().split('\n').slice(-12).join('\n') });
      }
    }
    return st;
  }, notebook);
}

const describeError = (e) => `code cell ${e.cell} (${JSON.stringify(e.first)}) raised ${e.ename}: ${e.evalue}\n${e.traceback}`;

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
  // JupyterLab's page config is JSON in a <script id="jupyter-config-data"> of the /lab page: before
  // the application reads it, switch its exposeAppInBrowser option on (the app is then
  // window.jupyterapp), for this page only. (Rewriting the response with page.route instead
  // breaks the kernel's websocket.)
  await page.addInitScript(() => {
    const expose = () => {
      const el = document.getElementById('jupyter-config-data');
      if (!el) return false;
      let cfg;
      try { cfg = JSON.parse(el.textContent); } catch (e) { return false; }  // not parsed in full yet
      if (cfg.exposeAppInBrowser !== true) {
        cfg.exposeAppInBrowser = true;
        el.textContent = JSON.stringify(cfg);
      }
      return true;
    };
    const observer = new MutationObserver(() => { if (expose()) observer.disconnect(); });
    observer.observe(document, { childList: true, subtree: true, characterData: true });
  });
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
    // Done when every non-empty code cell has run and nothing runs, or as soon as any cell (on
    // screen or not) holds an error output.
    await step('wait for the cells to finish', async () => {
      const deadline = Date.now() + args.timeout;
      for (;;) {
        const state = await notebookState(page, args.notebook);
        if (!state.found) throw new Error(state.why);
        if (state.errors.length) {
          await shot('error.png');
          throw new StepError(`notebook ${args.notebook} failed to execute: ${describeError(state.errors[0])}`);
        }
        if (state.running === 0 && state.kernel === 'idle' && state.executed === state.toRun
            && Date.now() - tRun > 1500) {
          result.cells_executed = state.executed;
          result.code_cells = state.codeCells;
          break;
        }
        if (Date.now() > deadline) {
          throw new Error(`cells still running after ${args.timeout / 1000} s (${state.executed}/${state.toRun} done, kernel ${state.kernel})`);
        }
        await page.waitForTimeout(500);
      }
    });
    result.run_s = (Date.now() - tRun) / 1000;

    // Every cell that shows sliders: is its plot there at first display, before any slider moves?
    // (Within 15 s of the run's end: the widgets render after the cells finish.) The images are
    // counted inside ipywidgets Output widgets (.widget-output) and in the whole output area, so
    // a figure that escaped the Output widget (and would stay behind on a move) shows up too.
    result.slider_cells = await step('the plots next to the sliders, before any move', async () => {
      const cells = page.locator('.jp-Notebook .jp-CodeCell').filter({ has: page.locator('.widget-slider') });
      const found = [];
      for (let i = 0; i < await cells.count(); i++) {
        const c = cells.nth(i);
        await c.scrollIntoViewIfNeeded();
        const sliders = (await c.locator('.widget-slider .widget-label').allInnerTexts()).map((t) => t.trim());
        let inWidget = 0;
        const deadline = Date.now() + 15000;
        while (Date.now() < deadline) {
          inWidget = await c.locator('.widget-output img').count();
          if (inWidget) break;
          await page.waitForTimeout(250);
        }
        found.push({ sliders, images_in_output_widget: inWidget,
                     images: await c.locator('.jp-Cell-outputArea img').count() });
      }
      return found;
    });
    result.plot_at_first_display = result.slider_cells.length > 0
      && result.slider_cells.every((c) => c.images_in_output_widget > 0);

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
      // (every image of the cell's output area: one plot before and after a move, never a stale extra one)
      const text = await readout.count() ? (await readout.first().innerText()).trim() : null;
      return { images: srcs.map((s) => sha(s)), readout: text };
    };
    const waitForImage = async () => {
      await output.locator('img').first().waitFor();
      await page.waitForTimeout(300);
    };
    // A notebook may draw its plot only when the slider moves (plot_at_first_display is then false,
    // which tests/test_browser.py refuses for the course). Then a first move draws plot A, and the
    // move below must change A into B, so the rest of the run still reports what it sees.
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
    const late = await notebookState(page, args.notebook);
    if (late.errors.length) throw new StepError(`moving the slider raised: ${describeError(late.errors[0])}`);
    await slider.scrollIntoViewIfNeeded();
    await shot('after.png');
    await shot('after-output.png', cell);
    if (args.save === '1') {
      // What Ctrl-S (or autosave) does: the server writes the .py and the paired .ipynb.
      await step('save the notebook (File > Save)', async () => {
        await page.evaluate(() => window.jupyterapp.commands.execute('docmanager:save'));
        const deadline = Date.now() + 30000;
        while ((await notebookState(page, args.notebook)).dirty) {
          if (Date.now() > deadline) throw new Error('the notebook is still unsaved after 30 s');
          await page.waitForTimeout(250);
        }
      });
      result.saved = true;
    }
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
