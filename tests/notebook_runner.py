"""One notebook run as nbdev's `test_nb` runs it, each cell timed (a module of its own, so worker processes can import it)"""
import os, sys, time
from pathlib import Path

def run_notebook(fn:Path, skip_flags:set):
    "nbdev's `test_nb`, timing each cell: (passed, seconds, [(cell number, seconds, first line) of each cell over a second])"
    from fastcore.xtras import working_directory
    from execnb.shell import CaptureShell
    from nbdev.process import NBProcessor
    from nbdev.frontmatter import FrontmatterProc
    os.environ['IN_TEST'] = '1'
    nb = NBProcessor(fn, procs=FrontmatterProc, process=True).nb
    def skip(cell):   # as nbdev's test_nb decides
        if cell.cell_type != 'code' or 'nbdev_export' + '(' in cell.source: return True
        direc = getattr(cell, 'directives_', {}) or {}
        return direc.get('eval:', [''])[0].lower() == 'false' or bool(skip_flags & direc.keys())
    times, started = [], [0.]
    def before(cell):
        started[0] = time.time(); return skip(cell)
    def after(cell): times.append((cell.idx_, time.time() - started[0], cell.source.strip().splitlines()[0][:70]))
    t0, shell = time.time(), CaptureShell(fn)
    try:
        with working_directory(fn.parent): shell.run_all(nb, exc_stop=True, preproc=before, postproc=after)
        ok = True
    except Exception:
        sys.stderr.write(shell.prettytb(fname=fn) + '\n'); ok = False
    return ok, time.time() - t0, sorted((t for t in times if t[1] >= 1), key=lambda t: -t[1])   # the cells over a second
