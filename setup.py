"""Build step of the wheel: ships the mobile demo inside the package (the rest is pyproject.toml).

    (cd mobile_demo && npm ci --ignore-scripts) && pip wheel --no-deps -w dist .

The web app is edited in mobile_demo/; building a wheel copies it (APP_FILES: the page, its
service worker, web app manifest and icons) into kvae/web/ together with the three onnxruntime-web
files app.js loads (not the 100+ MB of other variants in its dist/), so
`python -m kvae.demo RUN` works from an installed wheel. An editable install copies nothing:
kvae.demo then serves the checkout's mobile_demo/ and its node_modules/.
"""

from __future__ import annotations

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
APP = ROOT / "mobile_demo"
# kvae.demo.APP_FILES and ORT_FILES, repeated here (a build imports no kvae module; tests/test_demo.py
# checks they agree): the page, its service worker (sw.js), web app manifest and icons
APP_FILES = ("index.html", "app.js", "style.css", "sw.js", "manifest.webmanifest",
             "icons/icon-192.png", "icons/icon-512.png", "icons/icon-maskable-512.png",
             "icons/apple-touch-icon.png")
ORT_DIST = APP / "node_modules" / "onnxruntime-web" / "dist"
# app.js imports ort.wasm.min.mjs (kvae.demo.ORT_ENTRY), which loads the threaded SIMD build's
# glue module and its WebAssembly; tests/test_packaging.py checks this list against both files.
ORT_FILES = ("ort.wasm.min.mjs", "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm")
WEB = Path("kvae") / "web"  # in the wheel: kvae/web/{APP_FILES} and kvae/web/ort/{ORT_FILES}


def web_files() -> list[tuple[Path, Path]]:
    """(source, path inside the package tree) of every file the demo serves from a wheel."""
    return ([(APP / name, WEB / name) for name in APP_FILES]
            + [(ORT_DIST / name, WEB / "ort" / name) for name in ORT_FILES])


class BuildPyWithDemo(build_py):
    """build_py plus the demo's static files; fails with what to run if they are missing."""

    def run(self):
        super().run()
        if self.editable_mode:
            return
        missing = [str(src.relative_to(ROOT)) for src, _ in web_files() if not src.is_file()]
        if missing:
            raise SystemExit(f"kvae's wheel ships the mobile demo, which needs {', '.join(missing)}: "
                             "run (cd mobile_demo && npm ci --ignore-scripts) first")
        for src, dst in web_files():
            target = Path(self.build_lib) / dst
            self.mkpath(str(target.parent))
            self.copy_file(str(src), str(target))

    def get_outputs(self, include_bytecode=True):
        extra = [] if self.editable_mode else [str(Path(self.build_lib) / dst) for _, dst in web_files()]
        return super().get_outputs(include_bytecode) + extra


if __name__ == "__main__":  # setuptools runs it as __main__; tests import the lists above
    setup(cmdclass={"build_py": BuildPyWithDemo})
