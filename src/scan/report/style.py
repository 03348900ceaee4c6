"""The report's style sheet, inlined into report.html so the file is self-contained."""

CSS = """
:root { --bg:#f5f6fa; --card:#fff; --ink:#1f2430; --muted:#6b7280; --line:#e6e8ef; --accent:#3b4fd0; }
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--ink);
       font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
.wrap { max-width: 1180px; margin: 0 auto; padding: 0 24px; }
header.top { background: linear-gradient(120deg, #232b5c, #3b4fd0); color: #fff; padding: 30px 0 26px;
             margin-bottom: 24px; }
header.top h1 { margin: 0; font-size: 28px; font-weight: 650; letter-spacing: -.01em; }
header.top h1 em { font-style: normal; opacity: .85; }
header.top .sub { margin: 4px 0 0; opacity: .75; font-size: 13px; }
.card { background: var(--card); border: 1px solid var(--line); border-radius: 14px; padding: 18px 22px;
        margin-bottom: 20px; box-shadow: 0 1px 3px rgba(16, 24, 40, .05); }
.card > h2 { margin: 0 0 12px; font-size: 12px; font-weight: 650; color: var(--muted); text-transform: uppercase;
             letter-spacing: .07em; }
.source { margin: 0 0 14px; color: var(--muted); font-size: 13px; }
.stats { display: grid; grid-template-columns: repeat(auto-fit, minmax(150px, 1fr)); gap: 14px; }
.stat .v { font-size: 22px; font-weight: 650; overflow-wrap: anywhere; }   /* long backbone names wrap */
.stat .k { color: var(--muted); font-size: 12px; text-transform: uppercase; letter-spacing: .05em; }
table.metrics { border-collapse: collapse; font-variant-numeric: tabular-nums; min-width: 60%; }
table.metrics th, table.metrics td { padding: 6px 14px 6px 0; text-align: left; border-bottom: 1px solid var(--line); }
table.metrics th { color: var(--muted); font-weight: 600; font-size: 13px; }
.note { color: var(--muted); font-size: 13px; margin: 10px 0 0; }
code { background: #eef0f7; border-radius: 5px; padding: 1px 6px; font-size: 12.5px; }
.grid2 { display: grid; grid-template-columns: repeat(auto-fit, minmax(460px, 1fr)); gap: 0 20px; align-items: start; }
.grid2 svg { max-width: 100%; height: auto; }
.chips { display: flex; flex-wrap: wrap; gap: 8px; }
.chip { display: inline-flex; align-items: center; gap: 7px; padding: 4px 12px; border-radius: 999px;
        border: 1px solid var(--line); background: #fafbfd; color: var(--ink); text-decoration: none; font-size: 13px; }
.chip:hover { border-color: var(--c); }
.chip .dot { width: 9px; height: 9px; border-radius: 50%; background: var(--c); }
.chip .n { color: var(--muted); font-variant-numeric: tabular-nums; }
.curves { display: flex; flex-wrap: wrap; gap: 18px; }
svg text { font: 11px system-ui, sans-serif; fill: #4b5563; }
section.cluster { border-top: 4px solid var(--c); scroll-margin-top: 12px; }
section.cluster > header { display: flex; align-items: baseline; flex-wrap: wrap; gap: 4px 12px; }
section.cluster h2 { margin: 0; font-size: 20px; font-weight: 650; }
.badge { background: var(--c); color: #fff; border-radius: 7px; padding: 1px 9px; font-weight: 650; font-size: 13px; }
.meta { color: var(--muted); font-size: 13px; }
.row h3 { margin: 14px 0 6px; font-size: 11.5px; font-weight: 650; color: var(--muted); text-transform: uppercase;
          letter-spacing: .07em; }
.views { display: flex; flex-wrap: wrap; column-gap: 40px; }
.views .row.wide { flex-basis: 100%; }
.thumbs { display: flex; flex-wrap: wrap; gap: 8px; }
figure.thumb { margin: 0; text-align: center; }
figure.thumb img { display: block; width: 76px; height: 76px; object-fit: cover; border-radius: 9px;
                   background: #eef0f5; border: 1px solid var(--line); }
figure.thumb img.pixel { image-rendering: pixelated; }
figcaption { font-size: 11px; color: var(--muted); font-variant-numeric: tabular-nums; }
footer { color: var(--muted); font-size: 12px; text-align: center; padding: 10px 24px 40px; }
.map-wrap { display: flex; flex-wrap: wrap; gap: 16px; align-items: flex-start; }
svg.map { max-width: 100%; height: auto; background: #fafbfd; border: 1px solid var(--line); border-radius: 10px; }
svg.map circle { cursor: pointer; fill-opacity: .8; }
svg.map circle:hover, svg.map circle.pinned { stroke: #111; stroke-width: 1.5; fill-opacity: 1; }
.map-panel { width: 200px; font-size: 12px; color: var(--muted); overflow-wrap: anywhere; }
.map-panel img { display: block; width: 160px; height: 160px; object-fit: contain; border-radius: 9px;
                 background: #eef0f5; border: 1px solid var(--line); margin-bottom: 6px; }
.map-panel img.pixel, .members.pixel img { image-rendering: pixelated; }
.legend { display: flex; flex-wrap: wrap; gap: 4px 14px; margin-top: 8px; font-size: 12.5px; }
.legend .key { display: inline-flex; align-items: center; gap: 6px; }
.legend .dot { width: 9px; height: 9px; border-radius: 50%; background: var(--c); }
ul.merge { margin: 0; padding-left: 18px; font-size: 13px; }
ul.merge a { color: var(--c); font-weight: 600; }
.pager { display: flex; align-items: center; gap: 10px; margin-bottom: 8px; font-size: 13px; color: var(--muted); }
.pager button { border: 1px solid var(--line); background: #fafbfd; border-radius: 7px; padding: 2px 10px;
                cursor: pointer; }
.pager button:disabled { opacity: .4; cursor: default; }
header.top a { color: #fff; }
"""
