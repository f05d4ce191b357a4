"""Word timings from the audio alone, in the TextGrid layout the Montreal Forced Aligner writes (spec §3.5 input).

    python -m dataloaders.align AUDIO [AUDIO ...] --out_dir DIR [--transcript TXT ...] [--engine auto|pocketsphinx|whisper]
    python -m dataloaders.align --dataset ROOT    # ROOT/textgrid/<id>.TextGrid for each ROOT/wave16k/<id>.wav lacking one

Without a transcript the words are recognised; with one (plain text, or a TextGrid whose words are taken) exactly
those words are force-aligned. Engines: pocketsphinx (the pip wheel ships an English acoustic model, dictionary and
language model, nothing is downloaded) and faster-whisper (optional, stronger recogniser, needs its model files; with
a transcript its recognised words anchor the transcript's). `auto` takes faster-whisper when it is installed.
Recordings are decoded in chunks of at most CHUNK_SECONDS cut at pauses, so the decoder's memory does not grow with
the recording's length. Output files are written atomically.
"""
import argparse
import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dataloaders.beat2 import read_audio, read_words
from utils.log import get_logger

SR = 16000
FRAME = 160  # 10 ms: the decoders' frame
CHUNK_SECONDS = 120.0  # longest piece handed to a decoder at once (pocketsphinx: ~0.7 MB per second of it)
SILENCE_PEAK = 1e-3  # a waveform whose peak stays below this holds no speech
MIN_POSTERIOR = 0.02  # recognised words less likely are dropped (sample: precision 0.769 -> 0.781)
MISMATCH_AGREEMENT = 0.3  # transcript words the recogniser also heard, below which the transcript is suspect
ENGINES = ("auto", "pocketsphinx", "whisper")
WHISPER_MODEL = "base.en"

log = get_logger()


@dataclass
class Alignment:
    words: list  # [(start, end, word)], sorted, non-overlapping, lower case
    duration: float
    engine: str
    agreement: float = None  # with a transcript: share of its words the recogniser also heard (in order)
    heard: list = field(default_factory=list)  # the recogniser's words, also with a transcript
    warnings: list = field(default_factory=list)


# ---------------------------------------------------------------------------------------------- text

_ONES = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen " \
        "seventeen eighteen nineteen".split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
_ORDINAL = {"one": "first", "two": "second", "three": "third", "five": "fifth", "eight": "eighth", "nine": "ninth",
            "twelve": "twelfth"}
_SYMBOLS = {"%": "percent", "&": "and", "+": "plus", "@": "at", "$": "dollars", "€": "euros", "£": "pounds"}


def number_words(n):
    """Non-negative integer -> English words: 21 -> [twenty, one], 1300 -> [one, thousand, three, hundred]."""
    if n < 20:
        return [_ONES[n]]
    if n < 100:
        return [_TENS[n // 10]] + (number_words(n % 10) if n % 10 else [])
    if n < 1000:
        return number_words(n // 100) + ["hundred"] + (number_words(n % 100) if n % 100 else [])
    for size, name in ((10 ** 12, "trillion"), (10 ** 9, "billion"), (10 ** 6, "million"), (1000, "thousand")):
        if n >= size:
            return number_words(n // size) + [name] + (number_words(n % size) if n % size else [])
    raise AssertionError(n)


def _spoken_number(token):
    """'1990' -> nineteen ninety, '2021' -> twenty twenty one, '3.5' -> three point five, '21st' -> twenty first."""
    m = re.fullmatch(r"(\d+)(st|nd|rd|th)", token)
    if m:
        words = number_words(int(m.group(1)))
        last = words[-1]
        words[-1] = _ORDINAL.get(last, last[:-1] + "ieth" if last.endswith("y") else last + "th")
        return words
    if re.fullmatch(r"\d+\.\d+", token):
        whole, frac = token.split(".")
        return number_words(int(whole)) + ["point"] + [_ONES[int(d)] for d in frac]
    digits = token.replace(",", "")
    if not digits.isdigit():
        return None
    n = int(digits)
    if len(digits) == 4 and "," not in token and 1100 <= n <= 2099 and not 2000 <= n <= 2009 and n % 100:
        return number_words(n // 100) + (["oh"] if n % 100 < 10 else []) + number_words(n % 100)  # a year
    if len(digits) > 1 and digits[0] == "0":  # 007, phone numbers: digit by digit
        return [_ONES[int(d)] for d in digits]
    return number_words(n)


def normalise_transcript(text):
    """Free text -> the lower-case words a speaker says: punctuation dropped, numbers and symbols spelt out,
    hyphenated words split ('well-known' -> well known), apostrophes inside words kept (don't)."""
    text = text.lower().replace("\u2019", "'").replace("\u2018", "'")
    for symbol, word in _SYMBOLS.items():
        text = text.replace(symbol, f" {word} ")
    words = []
    for token in re.split(r"[\s\-\u2013\u2014/_]+", text):
        token = re.sub(r"^[^\w]+|[^\w]+$", "", token)  # leading/trailing punctuation, quotes
        token = re.sub(r"[^\w'.,]", "", token)
        if not token:
            continue
        for part in re.findall(r"\d[\d,]*(?:\.\d+)?(?:st|nd|rd|th)?|[^\W\d_][\w']*", token):
            spoken = _spoken_number(part.rstrip(".,")) if part[0].isdigit() else None
            if spoken:
                words += spoken
            elif not part[0].isdigit():
                words.append(re.sub(r"[.,]", "", part).strip("'"))
    return [w for w in words if w]


_LETTER_RULES = [  # grapheme -> ARPAbet, longest first; a rough letter-to-sound for words the dictionary lacks
    ("tch", "CH"), ("sch", "S K"), ("igh", "AY"), ("ough", "AO"), ("tion", "SH AH N"), ("sion", "ZH AH N"),
    ("ch", "CH"), ("sh", "SH"), ("th", "TH"), ("ph", "F"), ("wh", "W"), ("ck", "K"), ("ng", "NG"), ("qu", "K W"),
    ("gh", "G"), ("kn", "N"), ("wr", "R"), ("ee", "IY"), ("ea", "IY"), ("oo", "UW"), ("ou", "AW"), ("ow", "OW"),
    ("oi", "OY"), ("oy", "OY"), ("ai", "EY"), ("ay", "EY"), ("au", "AO"), ("aw", "AO"), ("ie", "IY"), ("ei", "EY"),
    ("ey", "IY"), ("er", "ER"), ("ir", "ER"), ("ur", "ER"), ("ar", "AA R"), ("or", "AO R"),
    ("a", "AE"), ("b", "B"), ("c", "K"), ("d", "D"), ("e", "EH"), ("f", "F"), ("g", "G"), ("h", "HH"), ("i", "IH"),
    ("j", "JH"), ("k", "K"), ("l", "L"), ("m", "M"), ("n", "N"), ("o", "AA"), ("p", "P"), ("q", "K"), ("r", "R"),
    ("s", "S"), ("t", "T"), ("u", "AH"), ("v", "V"), ("w", "W"), ("x", "K S"), ("y", "IY"), ("z", "Z"),
]


def letter_to_sound(word):
    """A pronunciation guessed from the spelling; crude, but it lets the aligner place any word of letters."""
    w = re.sub(r"[^a-z]", "", word.lower())
    w = re.sub(r"(.)\1+", r"\1", w)  # doubled letters sound once
    if len(w) > 2 and w.endswith("e") and w[-2] not in "aeiouy":
        w = w[:-1]  # silent final e
    phones, i = [], 0
    while i < len(w):
        for graph, sound in _LETTER_RULES:
            if w.startswith(graph, i):
                if graph == "y" and i == 0:
                    sound = "Y"
                phones += sound.split()
                i += len(graph)
                break
        else:
            i += 1
    return " ".join(phones) or "AH"


# ---------------------------------------------------------------------------------------------- audio

def frame_energy(y):
    """RMS of each 10 ms frame."""
    n = len(y) // FRAME
    frames = np.asarray(y[:n * FRAME], dtype=np.float64).reshape(n, FRAME)
    return np.sqrt((frames ** 2).mean(axis=1) + 1e-12)


def chunk_bounds(y, max_seconds=None):
    """[(start, end)] sample ranges covering y, each at most max_seconds long, cut in the middle of the longest
    pause in the second half of each chunk (so that a cut rarely falls inside a word)."""
    n, limit = len(y), int((max_seconds or CHUNK_SECONDS) * SR)
    if n <= limit:
        return [(0, n)]
    energy = frame_energy(y)
    quiet = energy < max(np.percentile(energy, 20) * 2.0, 1e-4)
    bounds, start = [], 0
    while n - start > limit:
        lo, hi = (start + limit // 2) // FRAME, min(len(quiet), (start + limit) // FRAME)
        best, best_len, run = None, -1, 0
        for f in range(lo, hi):  # longest run of quiet frames; its middle is the cut
            run = run + 1 if quiet[f] else 0
            if run > best_len:
                best, best_len = f - run // 2, run
        cut = best * FRAME if best_len > 0 else int(lo + np.argmin(energy[lo:hi])) * FRAME
        bounds.append((start, cut))
        start = cut
    bounds.append((start, n))
    return bounds


def word_gap_bounds(bounds, heard, y):
    """Move each cut of chunk_bounds into a gap between recognised words in the quarter-chunk before it, the
    quietest such gap first, then the widest: a transcript cannot be force-aligned across a cut that falls inside a
    word, and fluent speech can run for seconds without a pause. Chunks may then exceed CHUNK_SECONDS by a quarter."""
    if len(bounds) == 1 or len(heard) < 2:
        return bounds
    energy = frame_energy(y)
    reach = CHUNK_SECONDS / 4
    cuts = []
    for _, cut in bounds[:-1]:
        c, candidates = cut / SR, []
        for (_, s, _), (e, _, _) in zip(heard[:-1], heard[1:]):
            m = (s + e) / 2
            if c - reach <= m <= c + 0.5 and (not cuts or m * SR > cuts[-1] + SR):
                f0, f1 = int(s * 100), max(int(s * 100) + 1, int(e * 100))
                candidates.append((-float(energy[f0:f1].min(initial=np.inf)), e - s, m))
        cuts.append(int(max(candidates)[2] * 100) * FRAME if candidates else cut)
    edges = [0] + cuts + [len(y)]
    return [(edges[i], edges[i + 1]) for i in range(len(edges) - 1)]


def has_speech(y):
    return len(y) > 0 and float(np.abs(y).max()) >= SILENCE_PEAK


def spread_words(words, start, end):
    """Place words one after another over [start, end), each given time in proportion to its length."""
    if not words:
        return []
    end = max(end, start + 0.01 * len(words))
    weights = np.array([len(w) + 2.0 for w in words])
    edges = start + (end - start) * np.concatenate([[0.0], np.cumsum(weights) / weights.sum()])
    return [(float(edges[i]), float(edges[i + 1]), w) for i, w in enumerate(words)]


# ---------------------------------------------------------------------------------------------- engines

def _clean_word(word):
    return re.sub(r"\(\d+\)$", "", word).lower()


def _is_word(token):
    return bool(token) and not token.startswith(("<", "[", "+")) and token not in ("<s>", "</s>", "<sil>")


class PocketSphinx:
    """CMU pocketsphinx 5 with the English models its wheel ships."""
    name = "pocketsphinx"

    def __init__(self):
        try:
            import pocketsphinx
        except ImportError:
            raise ValueError("pocketsphinx is not installed (pip install pocketsphinx==5.1.1)") from None
        self._ps = pocketsphinx
        # wider beams than the defaults: onset recall@0.2 s 0.64 -> 0.70 and precision 0.71 -> 0.77 on the BEAT2
        # sample, at ~0.3 s of compute per second of audio
        self.recogniser = self._new_recogniser()
        self.aligner = pocketsphinx.Decoder(loglevel="FATAL", lm=None)  # forced alignment needs no language model
        self.initial_cmn = self.recogniser.get_cmn()
        self.cmn_at = {}  # chunk start sample -> cepstral mean when the recogniser reached it
        self.guessed = {}  # word -> phones added to the aligner's dictionary

    def _new_recogniser(self):
        return self._ps.Decoder(loglevel="FATAL", beam=1e-60, wbeam=1e-40, pbeam=1e-60)

    def _decode(self, decoder, pcm):
        decoder.start_utt()
        decoder.process_raw(pcm, full_utt=True)
        decoder.end_utt()
        return decoder.hyp()

    def recognise(self, y):
        # the cepstral mean adapts from chunk to chunk; a new recording starts afresh, so that its words do not
        # depend on what was decoded before it
        # a fresh decoder for each recording (0.3 s): a reused one carries state over (the cepstral mean and
        # more), so a recording's words would depend on what was decoded before it
        self.recogniser = self._new_recogniser()
        self.cmn_at = {}
        words = []
        for a, b in chunk_bounds(y):
            if not has_speech(y[a:b]):
                continue
            self.cmn_at[a] = self.recogniser.get_cmn()
            if self._decode(self.recogniser, _pcm16(y[a:b])) is None:
                continue
            self.recogniser.get_prob()  # computes the lattice posteriors that seg().prob then holds
            for seg in self.recogniser.seg():
                if _is_word(seg.word) and seg.prob >= MIN_POSTERIOR:
                    words.append((a / SR + seg.start_frame / 100, a / SR + (seg.end_frame + 1) / 100,
                                  _clean_word(seg.word)))
        return words

    def pronounce(self, word):
        """Make sure the aligner's dictionary has `word`: dictionary, else dictionary words it is made of, else
        letter-to-sound."""
        if self.aligner.lookup_word(word) is not None or word in self.guessed:
            return
        phones = None
        pieces = _split_compound(word, lambda w: self.aligner.lookup_word(w) is not None)
        if pieces:
            phones = " ".join(self.aligner.lookup_word(p) for p in pieces)
        phones = phones or letter_to_sound(word)
        self.aligner.add_word(word, phones, True)
        self.guessed[word] = phones
        log.info(f"'{word}' is not in the pronunciation dictionary; guessed /{phones}/")

    def align_chunk(self, y, words, start=0):
        """Force-align `words` to audio y (which starts at sample `start` of the recording last recognised); None
        when the aligner finds no path through them."""
        if not words:
            return []
        for w in set(words):
            self.pronounce(w)
        self.aligner.set_cmn(self.cmn_at.get(start, self.initial_cmn))  # as the recogniser had it there
        try:
            self.aligner.set_align_text(" ".join(words))
            hyp = self._decode(self.aligner, _pcm16(y))
        except RuntimeError:
            return None
        if hyp is None:
            return None
        out = [(s.start_frame / 100, (s.end_frame + 1) / 100, _clean_word(s.word)) for s in self.aligner.seg()
               if _is_word(s.word)]
        return out if [w for _, _, w in out] == list(words) else None


def _split_compound(word, known, max_pieces=3):
    """'mambatalk' -> ['mamba', 'talk'] when every piece is a dictionary word (fewest pieces, each >= 2 letters)."""
    best = {0: []}
    for end in range(1, len(word) + 1):
        for start in range(max(0, end - 20), end - 1):
            if start in best and known(word[start:end]) and len(best[start]) < max_pieces:
                cand = best[start] + [word[start:end]]
                if end not in best or len(cand) < len(best[end]):
                    best[end] = cand
    pieces = best.get(len(word))
    return pieces if pieces and len(pieces) > 1 else None


class Whisper:
    """faster-whisper (optional): CTranslate2 Whisper with word timestamps; `model` is a local folder or a hub name."""
    name = "whisper"

    def __init__(self, model=WHISPER_MODEL):
        try:
            from faster_whisper import WhisperModel
        except ImportError:
            raise ValueError("--engine whisper needs faster-whisper (pip install faster-whisper); "
                             "--engine pocketsphinx needs nothing more") from None
        try:
            self.model = WhisperModel(str(model), device="auto", compute_type="int8")
        except Exception as e:
            raise ValueError(f"faster-whisper model '{model}' cannot be loaded ({e})") from None

    def recognise(self, y):
        words = []
        for a, b in chunk_bounds(y):
            if not has_speech(y[a:b]):
                continue
            segments, _ = self.model.transcribe(y[a:b], language="en", word_timestamps=True, beam_size=5)
            for seg in segments:
                for w in seg.words or []:
                    spoken = normalise_transcript(w.word)
                    words += spread_words(spoken, a / SR + w.start, a / SR + max(w.end, w.start + 0.01))
        return words

    def align_chunk(self, y, words, start=0):
        return None  # no forced alignment: the transcript is placed on the recognised words' times (align_words)


def load_engine(engine="auto", whisper_model=WHISPER_MODEL):
    if engine not in ENGINES:
        raise ValueError(f"unknown engine '{engine}' (choose from {', '.join(ENGINES)})")
    if engine == "auto":
        import importlib.util
        if importlib.util.find_spec("faster_whisper") is not None:
            try:
                return Whisper(whisper_model)
            except ValueError as e:
                log.warning(f"{e}; using pocketsphinx")
        return PocketSphinx()
    return Whisper(whisper_model) if engine == "whisper" else PocketSphinx()


def _pcm16(y):
    return (np.clip(y, -1.0, 1.0) * 32767).astype(np.int16).tobytes()


# ---------------------------------------------------------------------------------------------- alignment

def anchor_times(transcript, heard, duration):
    """Place every transcript word on the recognised words' times: words the recogniser also heard (in order, by
    difflib) take its times; the others share the time between their neighbours. Returns ([(s, e, w)], agreement)."""
    if not transcript:
        return [], 1.0
    heard_words = [w for _, _, w in heard]
    matcher = difflib.SequenceMatcher(None, transcript, heard_words, autojunk=False)
    times = [None] * len(transcript)
    for block in matcher.get_matching_blocks():
        for k in range(block.size):
            times[block.a + k] = heard[block.b + k][:2]
    agreement = sum(t is not None for t in times) / len(transcript)
    out, i = [], 0
    while i < len(transcript):
        if times[i] is not None:
            out.append((times[i][0], times[i][1], transcript[i]))
            i += 1
            continue
        j = i
        while j < len(transcript) and times[j] is None:
            j += 1
        start = out[-1][1] if out else 0.0
        end = times[j][0] if j < len(transcript) else duration
        out += spread_words(transcript[i:j], start, end)  # too little room is made up by tidy()
        i = j
    return out, agreement


def tidy(words, duration, min_len=0.01):
    """Words in the order given (the spoken order), made inside [0, duration], non-overlapping and each at least
    min_len long: squeezed words push their neighbours aside rather than vanish, no word is ever dropped or
    reordered. Times to the millisecond."""
    if not words:
        return []
    min_len = min(min_len, duration / len(words))
    starts = np.array([max(0.0, s) for s, _, _ in words])
    ends = np.array([e for _, e, _ in words])
    for i in range(len(words)):  # forward: no overlap, minimum length
        if i:
            starts[i] = max(starts[i], ends[i - 1])
        ends[i] = max(ends[i], starts[i] + min_len)
    for i in reversed(range(len(words))):  # backward: inside the recording
        ends[i] = min(ends[i], duration if i == len(words) - 1 else starts[i + 1])
        starts[i] = min(starts[i], ends[i] - min_len)
    starts, ends = np.round(starts, 3), np.round(ends, 3)
    return [(float(s), float(e), w) for s, e, (_, _, w) in zip(starts, ends, words) if e > s]


def align_audio(y, transcript=None, engine="auto", name="audio", whisper_model=WHISPER_MODEL):
    """Words of a 16 kHz mono wave. transcript: list of words (normalised) or None to recognise. engine: a loaded
    engine, or its name (then loaded only when there is sound to decode).
    Warnings (no speech, a transcript that does not match) are logged and kept in the result."""
    duration = len(y) / SR
    result = Alignment([], duration, engine if isinstance(engine, str) else engine.name)
    if not has_speech(y):
        result.warnings.append(f"{name}: no speech found (the audio is silent); the words tier is empty"
                               + (" and the transcript is not used" if transcript else ""))
    else:
        if isinstance(engine, str):
            engine = load_engine(engine, whisper_model)
            result.engine = engine.name
        heard = result.heard = engine.recognise(y)
        if transcript is None:
            result.words = heard
            if not heard:
                result.warnings.append(f"{name}: no speech found (no words recognised); the words tier is empty")
        else:
            result.words, result.agreement = _force_align(y, list(transcript), heard, engine, name, result.warnings)
    result.words = tidy(result.words, duration)
    for w in result.warnings:
        log.warning(w)
    return result


def _force_align(y, transcript, heard, engine, name, warnings):
    """Chunk by chunk, the transcript words whose anchored time falls in the chunk are force-aligned to it. A word
    the recogniser timed on the wrong side of a cut would make the chunk unalignable, so the split is also tried a
    few words either way; a chunk the aligner still cannot place keeps the anchored times."""
    anchored, agreement = anchor_times(transcript, heard, len(y) / SR)
    if agreement < MISMATCH_AGREEMENT:
        warnings.append(f"{name}: the transcript does not seem to match the audio: the recogniser heard only "
                        f"{agreement:.0%} of its {len(transcript)} words (alignment score {agreement:.2f}); "
                        "check the word times")
    bounds = word_gap_bounds(chunk_bounds(y), heard, y)
    owner = np.searchsorted([b for _, b in bounds[:-1]], [s * SR for s, _, _ in anchored], side="right")
    splits = [int(np.searchsorted(owner, k, side="right")) for k in range(len(bounds))]  # end index per chunk
    words, failed, first = [], 0, 0
    for k, (a, b) in enumerate(bounds):
        last = k == len(bounds) - 1
        tries = [len(transcript)] if last else [splits[k] + d for d in (0, -1, 1, -2, 2)]
        for end in [e for e in tries if first <= e <= len(transcript)]:
            placed = engine.align_chunk(y[a:b], transcript[first:end], a) if end > first else []
            if placed is not None:
                words += [(s + a / SR, e + a / SR, w) for s, e, w in placed]
                first = end
                break
        else:
            end = max(first, min(splits[k], len(transcript))) if not last else len(transcript)
            failed += end - first
            words += anchored[first:end]
            first = end
    if failed and engine.name == "pocketsphinx":
        warnings.append(f"{name}: the aligner could not place {failed} of {len(transcript)} transcript words; they "
                        f"were spread between the recognised words (alignment score {agreement:.2f})")
    return words, agreement


# ---------------------------------------------------------------------------------------------- files

def read_transcript(path):
    """Plain text file -> normalised words; a .TextGrid -> the words of its 'words' tier."""
    path = Path(path)
    if path.suffix.lower() == ".textgrid":
        return [w.lower() for _, _, w in read_words(path) if w.strip()]
    if not path.is_file():
        raise FileNotFoundError(f"transcript not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError) as e:
        raise ValueError(f"{path}: cannot be read as a UTF-8 text file ({e})") from None
    return normalise_transcript(text)


def write_textgrid(path, words, duration):
    """MFA layout: one IntervalTier 'words' over [0, duration], silences as empty marks. Written atomically."""
    import textgrid
    from utils.checkpoint import atomic_write
    duration = round(float(duration), 6)
    tier = textgrid.IntervalTier("words", 0.0, duration)
    for s, e, w in tidy(words, duration):
        tier.add(s, e, w)
    grid = textgrid.TextGrid(maxTime=duration)
    grid.append(tier)
    with atomic_write(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            grid.write(f)
    return path


def align_file(audio, out, transcript=None, engine="auto"):
    """Align one recording and write its TextGrid; returns the Alignment."""
    y = read_audio(audio)
    words = read_transcript(transcript) if transcript else None
    result = align_audio(y, words, engine, name=str(audio))
    write_textgrid(out, result.words, result.duration)
    return result


def fill_dataset(root, engine=None):
    """ROOT/textgrid/<id>.TextGrid for every ROOT/wave16k/<id>.wav that has none; returns the files written."""
    root = Path(root)
    wav_dir, grid_dir = root / "wave16k", root / "textgrid"
    if not wav_dir.is_dir():
        raise FileNotFoundError(f"{root}: no wave16k/ folder (a BEAT2-layout dataset has ROOT/wave16k/<id>.wav)")
    todo = [w for w in sorted(wav_dir.glob("*.wav")) if not (grid_dir / f"{w.stem}.TextGrid").is_file()]
    log.info(f"{root}: {len(todo)} of {len(list(wav_dir.glob('*.wav')))} recordings need a TextGrid")
    if not todo:
        return []
    grid_dir.mkdir(exist_ok=True)
    engine = engine or load_engine()
    written = []
    for wav in todo:
        result = align_file(wav, grid_dir / f"{wav.stem}.TextGrid", engine=engine)
        log.info(f"{wav.name}: {len(result.words)} words ({result.engine})")
        written.append(grid_dir / f"{wav.stem}.TextGrid")
    return written


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("audio", nargs="*", help="recordings (wav or anything soundfile reads, any rate/channels)")
    p.add_argument("--out_dir", default="", help="folder for <stem>.TextGrid")
    p.add_argument("--transcript", nargs="*", default=[], help="one text file (or TextGrid) per recording")
    p.add_argument("--dataset", default="", help="BEAT2-layout ROOT: fill ROOT/textgrid/ for wavs lacking one")
    p.add_argument("--engine", default="auto", choices=ENGINES)
    p.add_argument("--whisper_model", default=WHISPER_MODEL,
                   help=f"faster-whisper model: a local folder or a hub name (default {WHISPER_MODEL})")
    args = p.parse_args(argv)
    from utils.log import setup_logging
    setup_logging()
    if bool(args.dataset) == bool(args.audio):
        p.error("give recordings with --out_dir, or --dataset ROOT")
    if args.dataset:
        return fill_dataset(args.dataset, load_engine(args.engine, args.whisper_model))
    if not args.out_dir:
        p.error("--out_dir is required with recordings")
    if args.transcript and len(args.transcript) != len(args.audio):
        p.error(f"{len(args.transcript)} transcripts for {len(args.audio)} recordings: give one per recording")
    from dataloaders.beat2 import audio_length
    for a in args.audio:  # check every input before writing anything
        audio_length(a)
    transcripts = [read_transcript(t) for t in args.transcript] or [None] * len(args.audio)
    stems = [Path(a).stem for a in args.audio]
    if len(set(stems)) != len(stems):
        raise ValueError(f"two recordings share a name, their TextGrids would overwrite each other: {stems}")
    engine = load_engine(args.engine, args.whisper_model)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for audio, words, stem in zip(args.audio, transcripts, stems):
        result = align_audio(read_audio(audio), words, engine, name=audio)
        out = write_textgrid(out_dir / f"{stem}.TextGrid", result.words, result.duration)
        score = "" if result.agreement is None else f", recogniser agreement {result.agreement:.2f}"
        log.info(f"wrote {out}: {len(result.words)} words ({result.engine}{score})")
        written.append(out)
    return written


if __name__ == "__main__":
    from utils.log import run_cli
    run_cli(main)
