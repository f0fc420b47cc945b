"""README.rst's ini snippets are valid configurations, and its two
one-line commands are the ones CI runs."""

import os
import re

from twisted.trial.unittest import SynchronousTestCase

from phantomd import config

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)


def _read(name):
    with open(os.path.join(ROOT, name), encoding="utf-8") as f:
        return f.read()


def literal_blocks(text):
    """The indented blocks that follow a line ending in '::'."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        if lines[i].rstrip().endswith("::"):
            i += 1
            block = []
            while i < len(lines) and (not lines[i].strip()
                                      or lines[i].startswith(" ")):
                block.append(lines[i])
                i += 1
            blocks.append("\n".join(block))
        else:
            i += 1
    return blocks


class SnippetTests(SynchronousTestCase):
    def test_every_ini_snippet_parses(self):
        snippets = [b for b in literal_blocks(_read("README.rst"))
                    if b.strip().startswith("[")
                    and "[introspection]" in b]
        self.assertGreaterEqual(len(snippets), 5)
        files = {}

        def local(match):
            path = match.group(0)
            if path not in files:
                files[path] = self.mktemp()
                with open(files[path], "w") as f:
                    f.write("placeholder\n")
            return files[path]

        for snippet in snippets:
            text = "\n".join(l.strip() for l in snippet.splitlines())
            text = re.sub(r"/etc/phantomd/[\w.-]+", local, text)
            text = "[phantomd]\nupstream = http://127.0.0.1:3000\n" + text
            c = config.parse(text, "README.rst")
            self.assertTrue(c.introspection.url.startswith("https://"))


class CommandTests(SynchronousTestCase):
    def test_ci_runs_the_readme_test_command(self):
        blocks = literal_blocks(_read("README.rst"))
        demo, tests = blocks[0].strip(), blocks[1].strip()
        self.assertIn("twistd -n phantomd --demo", demo)
        self.assertIn("twisted.trial", tests)
        self.assertIn("\n" + tests + "\n", _read(".ci/run"))
