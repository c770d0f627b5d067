"""Generate the small, fully synthetic demo sources that ship with the SAKE toolkit.

The files mirror the public layouts of the real sources (SAKURA, Dynamic-SUPERB Phase-2, MMLU, CREMA-D,
ESC-50) so that the same readers work on both. Speech is made with espeak-ng and shaped with sox; animal and
ambient sounds are synthesized with numpy. The output is deterministic: the same seed and the same tool versions
give byte-identical files (fixed WAV headers, no timestamps, no dither).

Usage::

    python -m tools.make_demo_sources --out sake_dataset/demo_sources --seed 0
    python -m tools.make_demo_sources --out /tmp/x --text-only   # metadata CSVs + MMLU Parquet, no espeak-ng needed
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
import random
import shutil
import subprocess
import tempfile
import wave
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import yaml

from sake_core.atomic import atomic_write
from sake_core.protocol import LABELS

LOGGER = logging.getLogger("make_demo_sources")

SAMPLE_RATE = 16000
MIN_SECONDS = 0.8
MAX_SECONDS = 1.95  # hard limit of the demo sources is 2.0 s; keep a margin
CLIPS_PER_LABEL = 8
NOISE_FLOOR = 3e-4  # standard deviation of the noise floor added to every clip (about -70 dBFS)
REPO_ROOT = Path(__file__).resolve().parents[1]
KNOWLEDGE_FILE = REPO_ROOT / "sake_dataset" / "portability_knowledge.yaml"
DEFAULT_OUT = REPO_ROOT / "sake_dataset" / "demo_sources"
MANAGED_SUBDIRS = ("sakura", "dynamic_superb", "mmlu", "pools")

# the label sets of the protocol (App. C.1), in its order
ANIMALS = list(LABELS["animal"])
EMOTIONS = list(LABELS["emotion"])
GENDERS = list(LABELS["gender"])
LANGUAGES = list(LABELS["language"])
TRACKS = {"Animal": ("animal", ANIMALS), "Emotion": ("emotion", EMOTIONS),
          "Gender": ("gender", GENDERS), "Language": ("language", LANGUAGES)}
ATTRIBUTE_LABELS = {"animal": ANIMALS, "emotion": EMOTIONS, "gender": GENDERS, "language": LANGUAGES}
KNOWLEDGE_CATEGORIES = {  # paper App. I.1
    "animal": ["behavior", "care_item", "diet", "family", "locomotion", "physical", "reproduction", "vocalization"],
    "emotion": ["descriptive_sentence", "facial_expression", "scenario", "social_interaction"],
    "gender": ["history", "celebrity", "cloth", "title", "vocal"],
    "language": ["iso", "city", "dish", "history", "language_family", "literary", "official_language", "test",
                 "translation"],
}
SAKURA_COLUMNS = ["file", "attribute_label", "single_instruction", "single_answer", "multi_instruction",
                  "multi_answer"]
DSUPERB_COLUMNS = ["file", "audio", "instruction", "label"]  # Phase-2 release layout: <Task>/data/test-*.parquet
DSUPERB_TABLE = "data/test-00000-of-00001.parquet"
ESC50_COLUMNS = ["filename", "fold", "target", "category", "esc10", "src_file", "take"]

MALE_VOICES = ["m1", "m2", "m3", "m4"]
FEMALE_VOICES = ["f1", "f2", "f3", "f4"]

# ----------------------------------------------------------------------------------------------- text content

SINGLE_QUESTIONS = {
    "animal": ["What animal is making the sound in the audio?",
               "Which animal do you hear in this recording?",
               "Identify the animal that produces the sound in this clip."],
    "emotion": ["What emotion is the speaker expressing in the audio?",
                "Which emotion best describes the speaker's tone of voice?",
                "How does the speaker in this recording feel?"],
    "gender": ["Please identify the gender of the speaker.",
               "What is the gender of the person speaking in the audio?",
               "Based on the voice, what is the speaker's gender?"],
    "language": ["What language is the speaker using in the audio?",
                 "Which language is spoken in this recording?",
                 "Identify the spoken language in the audio clip."],
}

ENGLISH_SENTENCES = [
    "The weather is nice today.", "Please close the door.", "I will call you tomorrow.",
    "The train leaves at noon.", "She bought fresh bread.", "We walked along the river.",
    "My phone is on the table.", "Turn left at the corner.", "Dinner is almost ready.",
    "The library opens at nine.", "He found his keys.", "The coffee is still hot.",
]

LANGUAGE_SPEECH = {  # label -> (Common Voice locale, espeak-ng voice, sentences)
    "English": ("en", "en-us", ENGLISH_SENTENCES[:8]),
    "German": ("de", "de", ["Das Wetter ist heute schön.", "Ich trinke gern Kaffee.", "Wo ist der Bahnhof?",
                            "Wir gehen morgen ins Kino.", "Das Buch liegt auf dem Tisch.", "Guten Morgen, Anna.",
                            "Ich wohne in einer kleinen Stadt.", "Der Zug kommt gleich."]),
    "Spanish": ("es", "es", ["Hoy hace muy buen tiempo.", "Me gusta mucho el café.", "¿Dónde está la estación?",
                             "Mañana vamos al cine.", "El libro está en la mesa.", "Buenos días, Carmen.",
                             "Vivo en una ciudad pequeña.", "El tren llega pronto."]),
    "French": ("fr", "fr-fr", ["Il fait beau aujourd'hui.", "J'aime beaucoup le café.", "Où est la gare ?",
                               "Nous allons au cinéma demain.", "Le livre est sur la table.", "Bonjour, Marie.",
                               "J'habite dans une petite ville.", "Le train arrive bientôt."]),
    "Italian": ("it", "it", ["Oggi il tempo è bello.", "Mi piace molto il caffè.", "Dov'è la stazione?",
                             "Domani andiamo al cinema.", "Il libro è sul tavolo.", "Buongiorno, Marco.",
                             "Abito in una piccola città.", "Il treno arriva presto."]),
    "Chinese": ("zh-CN", "cmn-latn-pinyin", ["今天天气很好。", "我很喜欢喝咖啡。", "火车站在哪里？",
                                             "明天我们去看电影。", "书在桌子上。", "早上好，小王。",
                                             "我住在一个小城市。", "火车马上就到。"]),
    "Japanese": ("ja", "ja", ["きょうはいいてんきです。", "コーヒーがすきです。", "えきはどこですか。",
                              "あしたえいがにいきます。", "ほんはつくえのうえです。", "おはようございます。",
                              "ちいさいまちにすんでいます。", "でんしゃはもうすぐきます。"]),
    "Korean": ("ko", "ko", ["오늘 날씨가 좋아요.", "저는 커피를 좋아해요.", "기차역이 어디예요?",
                            "내일 영화 보러 가요.", "책이 책상 위에 있어요.", "안녕하세요, 민수 씨.",
                            "저는 작은 도시에 살아요.", "기차가 곧 와요."]),
}

# Per-language speaking-rate band (wpm) and the centre (Hz) of a "channel" signature (EQ band + room tone): real corpora
# differ in rate and recording channel too, and these cues let a tiny encoder separate 8 languages from few clips.
LANGUAGE_CHANNEL = {"English": ((150, 165), 500), "German": ((140, 155), 800), "Spanish": ((175, 190), 1200),
                    "French": ((160, 175), 1700), "Italian": ((168, 183), 2300), "Chinese": ((130, 145), 3000),
                    "Japanese": ((185, 200), 3800), "Korean": ((155, 170), 4600)}

# CREMA-D sentence codes and their (public) sentence texts; emotion codes of CREMA-D.
CREMA_SENTENCES = {"IEO": "It's eleven o'clock.", "DFA": "Don't forget a jacket.", "TSI": "The surface is slick.",
                   "IWW": "I wonder what this is about.", "TAI": "The airplane is almost full.",
                   "IOM": "I'm on my way to the meeting."}
CREMA_EMOTION_CODES = {"angry": "ANG", "disgust": "DIS", "fear": "FEA", "happy": "HAP", "neutral": "NEU",
                       "sad": "SAD"}
CREMA_LEVELS = ["LO", "MD", "HI", "XX"]

# Emotion prosody: espeak-ng pitch range (0-99), speed range (wpm), peak level after normalization, sox effects.
EMOTION_STYLE: dict[str, dict[str, Any]] = {
    "happy": {"pitch": (82, 95), "speed": (220, 240), "level": 0.70, "effects": ["bass", "+4", "treble", "+4"]},
    "disgust": {"pitch": (5, 15), "speed": (115, 130), "level": 0.45,
                "effects": ["overdrive", "10", "10", "equalizer", "1100", "1q", "+14", "lowpass", "3200"]},
    "sad": {"pitch": (10, 20), "speed": (105, 120), "level": 0.14, "effects": ["lowpass", "1600"]},
    "fear": {"pitch": (85, 99), "speed": (135, 150), "level": 0.30,
             "effects": ["highpass", "400", "tremolo", "7", "95"]},
    "angry": {"pitch": (40, 55), "speed": (215, 235), "level": 0.97,
              "effects": ["overdrive", "25", "20", "treble", "+6"]},
    "neutral": {"pitch": (45, 55), "speed": (160, 175), "level": 0.40, "effects": []},
}

DSUPERB_INSTRUCTIONS = {
    "NoiseDetection": ["Is there background noise in this recording? Answer yes or no.",
                       "Listen to the audio. Does it contain background noise besides the speech? Answer yes or no."],
    "SpeechRateClassification": ["Is the speaker talking fast or slow? Answer fast or slow.",
                                 "Classify the speaking rate of the utterance. The answer could be fast or slow."],
    "LoudnessClassification": ["Is the speech in this recording loud or quiet? Answer loud or quiet.",
                               "Judge the loudness of the utterance. The answer could be loud or quiet."],
    "EmotionRecognition": ["Recognize the emotion of the speaker. The answer could be happy, disgust, sad, fear, "
                           "or angry."],
    "SpokenLanguageIdentification": ["Identify the language spoken in the audio. The answer could be English, "
                                     "German, Spanish, French, Italian, Chinese, Japanese, or Korean."],
}

# The attributes each demo task is about, written as the demo's Dynamic-SUPERB task table (the format of
# sake_dataset/dsuperb_tasks.yaml): the demo tasks are synthetic stand-ins, not Phase-2 tasks.
DSUPERB_TASK_ATTRIBUTES = {"EmotionRecognition": ["emotion"], "LoudnessClassification": [], "NoiseDetection": [],
                           "SpeechRateClassification": [], "SpokenLanguageIdentification": ["language"]}
TASK_TABLE_HEADER = """# Task table of the synthetic demo tasks in dynamic_superb/ (format of sake_dataset/dsuperb_tasks.yaml).
# These tasks imitate Dynamic-SUPERB task folders but are not Phase-2 tasks, so they have their own table;
# the demo build (build_splits.py --demo) passes it as an extra task table. Written by tools/make_demo_sources.py.
"""

# ESC-50 class indices (public metadata) of the categories used here.
ESC50_TARGETS = {"dog": 0, "rooster": 1, "pig": 2, "cow": 3, "frog": 4, "cat": 5, "hen": 6, "sheep": 8,
                 "crow": 9, "rain": 10, "sea_waves": 11}
ESC10_CATEGORIES = {"dog", "rooster", "rain", "sea_waves"}

MMLU_QUESTIONS: list[tuple[str, str, list[str], int]] = [
    # (subject, question, choices, answer index)
    ("elementary_mathematics", "What is 7 multiplied by 8?", ["54", "56", "64", "48"], 1),
    ("elementary_mathematics", "What is 144 divided by 12?", ["11", "14", "12", "10"], 2),
    ("elementary_mathematics", "What is one half plus one quarter?", ["2/6", "3/4", "1/8", "2/3"], 1),
    ("elementary_mathematics", "How many sides does a hexagon have?", ["6", "5", "8", "7"], 0),
    ("elementary_mathematics", "What is 15% of 200?", ["15", "20", "45", "30"], 3),
    ("elementary_mathematics", "Which of these numbers is prime?", ["21", "27", "29", "33"], 2),
    ("elementary_mathematics", "What is the perimeter of a square with side length 5 cm?",
     ["20 cm", "25 cm", "10 cm", "15 cm"], 0),
    ("elementary_mathematics", "What is 0.3 written as a fraction?", ["1/3", "3/100", "3/10", "30/10"], 2),
    ("elementary_mathematics", "What is the value of 2 to the power of 5?", ["10", "25", "16", "32"], 3),
    ("elementary_mathematics", "If x + 9 = 15, what is x?", ["6", "24", "5", "9"], 0),
    ("high_school_geography", "What is the capital city of Australia?",
     ["Sydney", "Canberra", "Melbourne", "Perth"], 1),
    ("high_school_geography", "Which is the largest ocean on Earth?",
     ["Atlantic Ocean", "Indian Ocean", "Pacific Ocean", "Arctic Ocean"], 2),
    ("high_school_geography", "On which continent is the Sahara Desert?",
     ["Asia", "Africa", "Australia", "South America"], 1),
    ("high_school_geography", "Which river flows through Cairo?", ["Nile", "Congo", "Niger", "Zambezi"], 0),
    ("high_school_geography", "Mount Everest lies on the border of Nepal and which other country?",
     ["India", "Bhutan", "Pakistan", "China"], 3),
    ("high_school_geography", "Which line of latitude divides the Earth into the Northern and Southern Hemispheres?",
     ["Equator", "Tropic of Cancer", "Prime Meridian", "Arctic Circle"], 0),
    ("high_school_geography", "Which country has the largest land area?",
     ["Canada", "China", "Russia", "United States"], 2),
    ("high_school_geography", "What is the capital city of Canada?", ["Toronto", "Vancouver", "Montreal", "Ottawa"], 3),
    ("high_school_geography", "The Andes mountain range is located on which continent?",
     ["South America", "Europe", "Africa", "Asia"], 0),
    ("high_school_geography", "Which sea lies between Europe and Africa?",
     ["Red Sea", "Mediterranean Sea", "Caspian Sea", "Black Sea"], 1),
    ("astronomy", "Which planet is closest to the Sun?", ["Venus", "Earth", "Mercury", "Mars"], 2),
    ("astronomy", "Which planet is the largest in the Solar System?", ["Saturn", "Jupiter", "Neptune", "Earth"], 1),
    ("astronomy", "What is the name of Earth's natural satellite?", ["Phobos", "Titan", "Europa", "the Moon"], 3),
    ("astronomy", "Approximately how long does Earth take to orbit the Sun?",
     ["365 days", "30 days", "24 hours", "100 years"], 0),
    ("astronomy", "Which planet is known as the Red Planet?", ["Jupiter", "Mars", "Venus", "Mercury"], 1),
    ("astronomy", "What is the Sun?", ["a planet", "a comet", "a star", "a galaxy"], 2),
    ("astronomy", "What is the name of the galaxy that contains our Solar System?",
     ["Andromeda", "Triangulum", "Sombrero", "Milky Way"], 3),
    ("astronomy", "Which planet is famous for its prominent ring system?", ["Saturn", "Mars", "Mercury", "Venus"], 0),
    ("astronomy", "What causes day and night on Earth?",
     ["Earth's orbit around the Sun", "Earth's rotation on its axis", "The Moon's orbit", "Solar flares"], 1),
    ("astronomy", "What force keeps the planets in orbit around the Sun?",
     ["magnetism", "friction", "gravity", "electric charge"], 2),
    ("high_school_biology", "What is the basic unit of life?", ["the atom", "the cell", "the organ", "the tissue"], 1),
    ("high_school_biology", "Which organelle is the site of photosynthesis in plant cells?",
     ["mitochondrion", "nucleus", "ribosome", "chloroplast"], 3),
    ("high_school_biology", "Which molecule carries genetic information in most living organisms?",
     ["DNA", "glucose", "cellulose", "ATP"], 0),
    ("high_school_biology", "Which organ pumps blood through the human body?",
     ["lungs", "liver", "heart", "kidney"], 2),
    ("high_school_biology", "What gas do plants take in from the air for photosynthesis?",
     ["oxygen", "carbon dioxide", "nitrogen", "helium"], 1),
    ("high_school_biology", "Which blood cells carry oxygen?",
     ["red blood cells", "white blood cells", "platelets", "plasma cells"], 0),
    ("high_school_biology", "How many chromosomes does a typical human body cell contain?",
     ["23", "44", "48", "46"], 3),
    ("high_school_biology", "Which process produces two genetically identical daughter cells?",
     ["meiosis", "fertilization", "mitosis", "mutation"], 2),
    ("high_school_biology", "What type of animal is a frog?", ["reptile", "amphibian", "mammal", "fish"], 1),
    ("high_school_biology", "Which organelle is known as the powerhouse of the cell?",
     ["mitochondrion", "Golgi apparatus", "vacuole", "cell wall"], 0),
    ("high_school_chemistry", "What is the chemical symbol for gold?", ["Ag", "Go", "Gd", "Au"], 3),
    ("high_school_chemistry", "What is the chemical formula of water?", ["CO2", "H2O", "O2", "NaCl"], 1),
    ("high_school_chemistry", "What is the pH of pure water at 25 degrees Celsius?", ["7", "0", "14", "1"], 0),
    ("high_school_chemistry", "Which particle has a negative electric charge?",
     ["proton", "neutron", "electron", "nucleus"], 2),
    ("high_school_chemistry", "Which gas makes up most of Earth's atmosphere?",
     ["oxygen", "carbon dioxide", "argon", "nitrogen"], 3),
    ("high_school_chemistry", "What is the atomic number of carbon?", ["12", "6", "8", "14"], 1),
    ("high_school_chemistry", "Table salt is the compound sodium chloride. What is its formula?",
     ["NaCl", "KCl", "Na2O", "HCl"], 0),
    ("high_school_chemistry", "At sea level, at what temperature does water boil?",
     ["50 degrees Celsius", "90 degrees Celsius", "100 degrees Celsius", "120 degrees Celsius"], 2),
    ("high_school_chemistry", "Which of these elements is a noble gas?", ["hydrogen", "neon", "oxygen", "chlorine"], 1),
    ("high_school_chemistry", "What is the chemical symbol for iron?", ["Ir", "In", "I", "Fe"], 3),
    ("high_school_computer_science", "How many bits are in one byte?", ["4", "8", "16", "32"], 1),
    ("high_school_computer_science", "What is the binary representation of the decimal number 5?",
     ["101", "110", "111", "100"], 0),
    ("high_school_computer_science", "Which data structure follows the last-in, first-out principle?",
     ["queue", "linked list", "stack", "hash table"], 2),
    ("high_school_computer_science", "What does CPU stand for?",
     ["Central Program Utility", "Computer Personal Unit", "Control Processing Unit", "Central Processing Unit"], 3),
    ("high_school_computer_science", "What is the decimal value of the binary number 1000?", ["8", "16", "4", "10"], 0),
    ("high_school_computer_science", "Which logic gate outputs true only when both inputs are true?",
     ["OR", "AND", "XOR", "NOT"], 1),
    ("high_school_computer_science", "What is the worst-case time complexity of binary search on n sorted items?",
     ["O(n)", "O(n^2)", "O(log n)", "O(1)"], 2),
    ("high_school_computer_science", "Which of these is a programming language?",
     ["HTTP", "Python", "HTML5 canvas", "JPEG"], 1),
    ("high_school_computer_science", "In most programming languages, what is the index of the first element of "
     "an array?", ["1", "-1", "it depends on its length", "0"], 3),
    ("high_school_computer_science", "What does RAM stand for?",
     ["Random Access Memory", "Read Always Memory", "Rapid Array Module", "Run Access Mode"], 0),
]

# ------------------------------------------------------------------------------------------------ utilities


def clip_rng(seed: int, key: str) -> np.random.Generator:
    """A numpy generator for one clip, stable under adding or removing other clips."""
    return np.random.default_rng([seed, zlib.crc32(key.encode("utf-8"))])


def wav_bytes(samples: np.ndarray, sample_rate: int = SAMPLE_RATE) -> bytes:
    """Encode float samples in [-1, 1] as a 16-bit mono PCM WAV (plain 44-byte header, no metadata)."""
    pcm = np.clip(np.round(samples * 32767.0), -32768, 32767).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as handle:
        handle.setnchannels(1)
        handle.setsampwidth(2)
        handle.setframerate(sample_rate)
        handle.writeframes(pcm.tobytes())
    return buf.getvalue()


def csv_bytes(columns: Sequence[str], rows: Iterable[dict[str, Any]]) -> bytes:
    """Encode rows as UTF-8 CSV with a header line and LF line ends."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(row)
    return buf.getvalue().encode("utf-8")


def finish_clip(x: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
    """Trim silence, cut to MAX_SECONDS (with a fade-out), pad to MIN_SECONDS, set the peak to `level`, add a floor."""
    x = np.asarray(x, dtype=np.float64)
    peak = float(np.max(np.abs(x))) if x.size else 0.0
    if peak <= 0.0:
        raise ValueError("synthesized clip is silent")
    loud = np.flatnonzero(np.abs(x) > 0.03 * peak)
    margin = int(0.02 * SAMPLE_RATE)
    x = x[max(0, loud[0] - margin): loud[-1] + margin]
    max_len = int(MAX_SECONDS * SAMPLE_RATE)
    if len(x) > max_len - int(0.08 * SAMPLE_RATE):
        x = x[: max_len - int(0.08 * SAMPLE_RATE)].copy()
        fade = int(0.05 * SAMPLE_RATE)
        x[-fade:] *= np.linspace(1.0, 0.0, fade)
    lead = np.zeros(int(rng.integers(int(0.01 * SAMPLE_RATE), int(0.06 * SAMPLE_RATE))))
    x = np.concatenate([lead, x])
    min_len = int(MIN_SECONDS * SAMPLE_RATE)
    if len(x) < min_len:
        x = np.concatenate([x, np.zeros(min_len - len(x))])
    x = x[:max_len] * (level / float(np.max(np.abs(x))))
    return x + NOISE_FLOOR * rng.standard_normal(len(x))  # no digital silence: a faint, constant noise floor


# -------------------------------------------------------------------------------------------- speech (espeak)


def tool_version(command: list[str]) -> str:
    """First line of a tool's version output, or 'missing'."""
    try:
        out = subprocess.run(command, check=True, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError):
        return "missing"
    return (out.stdout or out.stderr).strip().splitlines()[0]


class SpeechSynth:
    """espeak-ng + sox speech renderer working in a private temporary folder."""

    def __init__(self) -> None:
        for tool in ("espeak-ng", "sox"):
            if shutil.which(tool) is None:
                raise RuntimeError(f"{tool} is required to synthesize the demo audio (apt-get install {tool})")
        self._tmp = tempfile.TemporaryDirectory(prefix="sake_demo_")
        self._raw = Path(self._tmp.name) / "espeak.wav"

    def close(self) -> None:
        self._tmp.cleanup()

    def render(self, text: str, voice: str, pitch: int, speed: int, effects: Sequence[str] = ()) -> np.ndarray:
        """Speak `text` and return float samples at 16 kHz after the given sox effects."""
        subprocess.run(["espeak-ng", "-v", voice, "-p", str(pitch), "-s", str(speed), "-a", "100",
                        "-w", str(self._raw), text], check=True, capture_output=True)
        cmd = ["sox", "-R", "-D", "-V1", str(self._raw), "-t", "f32", "-c", "1", "-", *effects,
               "rate", "-h", str(SAMPLE_RATE)]
        out = subprocess.run(cmd, check=True, capture_output=True).stdout
        samples = np.frombuffer(out, dtype="<f4").astype(np.float64)
        if samples.size == 0:
            raise RuntimeError(f"espeak-ng/sox produced no audio for {text!r} (voice {voice})")
        return samples


def voice_for(lang_voice: str, gender: str, index: int) -> str:
    pool = MALE_VOICES if gender == "male" else FEMALE_VOICES
    return f"{lang_voice}+{pool[index % len(pool)]}"


def emotional_speech(synth: SpeechSynth, emotion: str, gender: str, index: int, text: str,
                     rng: np.random.Generator) -> np.ndarray:
    style = EMOTION_STYLE[emotion]
    pitch = int(rng.integers(style["pitch"][0], style["pitch"][1] + 1))
    speed = int(rng.integers(style["speed"][0], style["speed"][1] + 1))
    x = synth.render(text, voice_for("en-us", gender, index), pitch, speed, style["effects"])
    level = style["level"] * float(rng.uniform(0.9, 1.05))
    return finish_clip(x, min(level, 0.99), rng)


def gendered_speech(synth: SpeechSynth, gender: str, index: int, text: str, rng: np.random.Generator,
                    language: str = "English") -> np.ndarray:
    """Speech in `language` by a male or female voice, with the language's speaking-rate band and colouring."""
    _, lang_voice, _ = LANGUAGE_SPEECH[language]
    (slow, fast), centre = LANGUAGE_CHANNEL[language]
    if gender == "male":
        pitch, effects = int(rng.integers(25, 45)), ["pitch", "-100"]
    else:
        pitch, effects = int(rng.integers(65, 85)), ["pitch", "+150"]
    effects = effects + ["equalizer", str(centre), "1q", "+12"]
    x = synth.render(text, voice_for(lang_voice, gender, index), pitch, int(rng.integers(slow, fast + 1)), effects)
    level = float(rng.uniform(0.45, 0.8))
    x = finish_clip(x, level, rng)
    room_tone = noise(len(x), rng, 0.8 * centre, 1.25 * centre) * level * 10 ** (-30 / 20)
    return x + room_tone


# ------------------------------------------------------------------------------------------- sound synthesis


def band_filter(x: np.ndarray, low: float, high: float) -> np.ndarray:
    """Zero-phase FFT band-pass between `low` and `high` Hz with soft 10% edges."""
    spec = np.fft.rfft(x)
    freqs = np.fft.rfftfreq(len(x), 1.0 / SAMPLE_RATE)
    gain = np.clip((freqs - 0.9 * low) / max(0.1 * low, 1.0), 0, 1) * np.clip((1.1 * high - freqs) / (0.1 * high), 0, 1)
    return np.fft.irfft(spec * gain, n=len(x))


def harmonic(f0: np.ndarray, formants: Sequence[tuple[Any, float, float]], rng: np.random.Generator,
             tilt: float = 1.0, max_freq: float = 7500.0) -> np.ndarray:
    """Harmonic tone following the contour `f0` (Hz per sample), shaped by Gaussian formants.

    Each formant is (centre Hz, a number or a per-sample array; width Hz; gain).
    """
    f0 = np.asarray(f0, dtype=np.float64)
    phase = 2.0 * np.pi * np.cumsum(f0) / SAMPLE_RATE
    out = np.zeros_like(f0)
    n_harm = int(max_freq / max(float(f0.min()), 40.0))
    for k in range(1, n_harm + 1):
        freq = k * f0
        gain = 0.15 / (1.0 + (freq / 1000.0) ** tilt)
        for centre, width, amp in formants:
            gain = gain + amp * np.exp(-0.5 * ((freq - centre) / width) ** 2)
        gain = np.where(freq < max_freq, gain, 0.0)
        out += gain * np.sin(k * phase + rng.uniform(0, 2 * np.pi))
    return out


def envelope(n: int, attack: float, release: float) -> np.ndarray:
    """Linear attack then linear release (seconds), flat in between."""
    env = np.ones(n)
    a = max(1, min(n // 2, int(attack * SAMPLE_RATE)))
    r = max(1, min(n - a, int(release * SAMPLE_RATE)))
    env[:a] = np.linspace(0.0, 1.0, a)
    env[n - r:] *= np.linspace(1.0, 0.0, r)
    return env


def contour(n: int, points: Sequence[float]) -> np.ndarray:
    """Piecewise-linear contour through `points`, spread evenly over `n` samples."""
    return np.interp(np.linspace(0, len(points) - 1, n), np.arange(len(points)), points)


def noise(n: int, rng: np.random.Generator, low: float, high: float) -> np.ndarray:
    x = band_filter(rng.standard_normal(n), low, high)
    return x / (np.max(np.abs(x)) + 1e-12)


def sequence(parts: Sequence[np.ndarray], gaps: Sequence[float]) -> np.ndarray:
    """Concatenate sound events with silent gaps (seconds) between them."""
    out: list[np.ndarray] = []
    for i, part in enumerate(parts):
        out.append(part)
        if i < len(gaps):
            out.append(np.zeros(int(gaps[i] * SAMPLE_RATE)))
    return np.concatenate(out)


def secs(rng: np.random.Generator, low: float, high: float) -> int:
    return int(rng.uniform(low, high) * SAMPLE_RATE)


def dog_sound(rng: np.random.Generator) -> np.ndarray:
    barks = []
    for _ in range(int(rng.integers(2, 5))):
        n = secs(rng, 0.11, 0.2)
        f0 = contour(n, [rng.uniform(600, 760), rng.uniform(480, 560), rng.uniform(330, 420)])
        tone = harmonic(f0, [(1100, 300, 0.5), (2300, 400, 0.3)], rng)
        burst = noise(n, rng, 400, 3000)
        env = envelope(n, 0.008, 0.02) * np.exp(-np.linspace(0, 3.5, n))
        barks.append((tone / np.max(np.abs(tone)) + 0.6 * burst) * env)
    return sequence(barks, [rng.uniform(0.12, 0.28) for _ in barks])


def cat_sound(rng: np.random.Generator) -> np.ndarray:
    meows = []
    for _ in range(int(rng.integers(1, 3))):
        n = secs(rng, 0.55, 0.85)
        f0 = contour(n, [rng.uniform(420, 520), rng.uniform(720, 900), rng.uniform(650, 780), rng.uniform(380, 470)])
        vowel = contour(n, [700, 1900, 1500, 900])  # moving formant: "m-ee-ow"
        tone = harmonic(f0, [(vowel, 350.0, 0.6), (3000, 500, 0.15)], rng)
        meows.append(tone * np.sin(np.linspace(0, np.pi, n)) ** 0.7)
    return sequence(meows, [rng.uniform(0.15, 0.3) for _ in meows])


def pig_sound(rng: np.random.Generator) -> np.ndarray:
    grunts = []
    for _ in range(int(rng.integers(3, 6))):
        n = secs(rng, 0.1, 0.2)
        base = rng.uniform(70, 110)
        f0 = base * (1 + 0.08 * rng.standard_normal(n).cumsum() / np.sqrt(np.arange(1, n + 1)))
        tone = harmonic(np.clip(f0, 50, 160), [(400, 150, 0.8), (900, 200, 0.3)], rng, tilt=2.0, max_freq=2500)
        grunt = tone / np.max(np.abs(tone)) + 0.5 * noise(n, rng, 100, 1200)
        grunts.append(grunt * envelope(n, 0.015, 0.06))
    return sequence(grunts, [rng.uniform(0.04, 0.18) for _ in grunts])


def cow_sound(rng: np.random.Generator) -> np.ndarray:
    n = secs(rng, 1.1, 1.6)
    base = rng.uniform(100, 135)
    f0 = contour(n, [base, base * 1.12, base * 1.08, base * 0.85]) * (1 + 0.02 * np.sin(
        2 * np.pi * 4.5 * np.arange(n) / SAMPLE_RATE))
    opening = contour(n, [0.0, 1.0, 1.0, 0.6])
    closed = harmonic(f0, [(300, 120, 1.0)], rng, tilt=2.5, max_freq=3000)
    opened = harmonic(f0, [(650, 200, 1.0), (1100, 250, 0.5)], rng, tilt=1.5, max_freq=4000)
    return ((1 - opening) * closed + opening * opened) * envelope(n, 0.15, 0.3)


def frog_sound(rng: np.random.Generator) -> np.ndarray:
    croaks = []
    for _ in range(int(rng.integers(3, 6))):
        n = secs(rng, 0.12, 0.2)
        f0 = np.full(n, rng.uniform(180, 260))
        tone = harmonic(f0, [(500, 150, 0.8), (1500, 300, 0.4)], rng, max_freq=4000)
        rate = rng.uniform(40, 70)
        pulses = (np.sin(2 * np.pi * rate * np.arange(n) / SAMPLE_RATE) > 0.2).astype(float)
        croaks.append(tone * pulses * envelope(n, 0.01, 0.03))
    return sequence(croaks, [rng.uniform(0.08, 0.22) for _ in croaks])


def hen_sound(rng: np.random.Generator) -> np.ndarray:
    clucks = []
    for _ in range(int(rng.integers(4, 8))):
        n = secs(rng, 0.05, 0.09)
        start = rng.uniform(320, 450)
        f0 = contour(n, [start, start * 0.8])
        tone = harmonic(f0, [(1000, 250, 0.7), (2500, 400, 0.4)], rng)
        clucks.append(tone * envelope(n, 0.005, 0.03))
    n = secs(rng, 0.2, 0.3)  # a final longer "bawk"
    f0 = contour(n, [rng.uniform(450, 520), rng.uniform(600, 680), rng.uniform(520, 560)])
    clucks.append(harmonic(f0, [(1200, 300, 0.7), (2600, 400, 0.4)], rng) * envelope(n, 0.01, 0.08))
    return sequence(clucks, [rng.uniform(0.07, 0.2) for _ in clucks])


def rooster_sound(rng: np.random.Generator) -> np.ndarray:
    peak = rng.uniform(750, 900)
    pieces = []
    for dur, pts in [((0.12, 0.18), [500, 650]), ((0.12, 0.18), [600, 720]),
                     ((0.6, 0.85), [peak, peak * 1.04, peak * 0.97]), ((0.18, 0.25), [700, 450])]:
        n = secs(rng, *dur)
        f0 = contour(n, [p * rng.uniform(0.95, 1.05) for p in pts])
        f0 = f0 * (1 + 0.015 * np.sin(2 * np.pi * 7 * np.arange(n) / SAMPLE_RATE))
        tone = harmonic(f0, [(1600, 400, 0.7), (2800, 500, 0.5)], rng)
        tone = tone / np.max(np.abs(tone)) + 0.12 * noise(n, rng, 1000, 5000)
        pieces.append(tone * envelope(n, 0.02, 0.04))
    return sequence(pieces, [rng.uniform(0.02, 0.05), rng.uniform(0.02, 0.05), 0.0])


def sheep_sound(rng: np.random.Generator) -> np.ndarray:
    bleats = []
    for _ in range(int(rng.integers(1, 3))):
        n = secs(rng, 0.55, 0.85)
        t = np.arange(n) / SAMPLE_RATE
        rate = rng.uniform(6.0, 9.0)
        base = rng.uniform(280, 380)
        f0 = base * (1 + 0.08 * np.sin(2 * np.pi * rate * t)) * contour(n, [1.0, 1.05, 0.95])
        tone = harmonic(f0, [(700, 200, 0.7), (1700, 300, 0.5), (2600, 300, 0.2)], rng)
        am = 1 - 0.5 * (0.5 + 0.5 * np.sin(2 * np.pi * rate * t + 1.0))
        bleats.append(tone * am * envelope(n, 0.04, 0.15))
    return sequence(bleats, [rng.uniform(0.2, 0.35) for _ in bleats])


def crow_sound(rng: np.random.Generator) -> np.ndarray:
    caws = []
    for _ in range(int(rng.integers(2, 5))):
        n = secs(rng, 0.2, 0.32)
        start = rng.uniform(480, 650)
        f0 = contour(n, [start, start * 1.05, start * 0.8])
        tone = harmonic(f0, [(1400, 400, 0.8), (2600, 500, 0.6)], rng)
        rough = 1 + 0.9 * noise(n, rng, 30, 400)
        caw = band_filter(tone / np.max(np.abs(tone)) * rough + 0.3 * noise(n, rng, 800, 3500), 700, 4000)
        caws.append(caw * envelope(n, 0.01, 0.06))
    return sequence(caws, [rng.uniform(0.08, 0.2) for _ in caws])


def rain_sound(rng: np.random.Generator) -> np.ndarray:
    n = secs(rng, 1.2, 1.8)
    x = 0.4 * noise(n, rng, 500, 7000)
    for pos in rng.integers(0, n - 400, size=int(rng.integers(20, 40))):
        x[pos:pos + 400] += rng.uniform(0.3, 1.0) * np.exp(-np.arange(400) / 40.0) * rng.standard_normal(400)
    return x


def sea_waves_sound(rng: np.random.Generator) -> np.ndarray:
    n = secs(rng, 1.2, 1.8)
    swell = 0.3 + 0.7 * np.sin(np.linspace(0, np.pi * rng.uniform(1.0, 2.0), n)) ** 2
    return noise(n, rng, 60, 1500) * swell


SOUND_SYNTHS: dict[str, Callable[[np.random.Generator], np.ndarray]] = {
    "dog": dog_sound, "cat": cat_sound, "pig": pig_sound, "cow": cow_sound, "frog": frog_sound, "hen": hen_sound,
    "rooster": rooster_sound, "sheep": sheep_sound, "crow": crow_sound, "rain": rain_sound,
    "sea_waves": sea_waves_sound,
}


def environmental_sound(category: str, rng: np.random.Generator) -> np.ndarray:
    x = SOUND_SYNTHS[category](rng)
    x = x / np.max(np.abs(x))
    x = x + 10 ** (rng.uniform(-55, -45) / 20) * rng.standard_normal(len(x))  # faint room noise
    return finish_clip(x, float(rng.uniform(0.5, 0.9)), rng)


# ---------------------------------------------------------------------------------------------- the plan


@dataclass
class Clip:
    """One audio file to write: its path under --out and how to render it."""

    path: str
    render: Callable[[SpeechSynth | None, np.random.Generator], np.ndarray]
    key: str = ""


def letter(i: int) -> str:
    return f"({chr(ord('a') + i)})"


def format_options(question: str, options: Sequence[str]) -> str:
    return question + " " + " ".join(f"{letter(i)} {text}" for i, text in enumerate(options))


def knowledge_problems(knowledge: dict[str, Any]) -> list[str]:
    """Everything wrong with a portability knowledge mapping (empty list when it is valid).

    Checks: the App. I.1 categories of every attribute, 2-3 questions per category without inline options, one
    non-empty answer per label, at least 3 distinct answer texts per category (answers plus `alternatives`),
    alternatives that are not the answer of another label, and every label pair differing in some category.
    """
    problems: list[str] = []
    for attribute, labels in ATTRIBUTE_LABELS.items():
        categories = (knowledge.get(attribute) or {}).get("categories") or {}
        if sorted(categories) != sorted(KNOWLEDGE_CATEGORIES[attribute]):
            expected = sorted(KNOWLEDGE_CATEGORIES[attribute])
            problems.append(f"{attribute}: categories {sorted(categories)} != {expected}")
            continue
        for category, block in categories.items():
            where = f"{attribute}/{category}"
            questions = block.get("questions") or []
            if not 2 <= len(questions) <= 3 or not all(isinstance(q, str) and q.strip() for q in questions):
                problems.append(f"{where}: expected 2-3 question strings")
            if any("(a)" in q for q in questions):
                problems.append(f"{where}: questions must not carry inline options")
            answers = block.get("answers") or {}
            if sorted(answers) != sorted(labels):
                problems.append(f"{where}: answers cover {sorted(answers)}, expected {sorted(labels)}")
                continue
            if not all(isinstance(a, str) and a.strip() for a in answers.values()):
                problems.append(f"{where}: empty answer")
            alternatives = block.get("alternatives") or {}
            texts = set(answers.values()) | {t for alts in alternatives.values() for t in alts}
            if len(texts) < 3:
                problems.append(f"{where}: only {len(texts)} distinct answer texts (need 3)")
            for label, alts in alternatives.items():
                clash = [t for t in alts for other in labels if other != label and t == answers[other]]
                if label not in labels or clash:
                    problems.append(f"{where}: bad alternatives for {label!r} {clash}")
        for i, first in enumerate(labels):
            for second in labels[i + 1:]:
                if all(block["answers"].get(first) == block["answers"].get(second) for block in categories.values()):
                    problems.append(f"{attribute}: {first} and {second} share every answer")
    return problems


def load_knowledge(path: Path = KNOWLEDGE_FILE) -> dict[str, Any]:
    """Read and validate the portability knowledge file."""
    with open(path, encoding="utf-8") as handle:
        knowledge = yaml.safe_load(handle)
    problems = knowledge_problems(knowledge if isinstance(knowledge, dict) else {})
    if problems:
        raise ValueError(f"{path}: " + "; ".join(problems))
    return knowledge


def multi_hop_question(knowledge: dict[str, Any], attribute: str, labels: Sequence[str], label: str,
                       category: str, rng: random.Random) -> tuple[str, str]:
    """A 4-option multi-hop question about `label` from the knowledge file, and its answer `(x) text`."""
    block = knowledge[attribute]["categories"][category]
    correct = block["answers"][label]
    wrong: list[str] = []
    for other in labels:
        if other == label:
            continue
        for text in [block["answers"][other], *block.get("alternatives", {}).get(other, [])]:
            if text != correct and text not in wrong:
                wrong.append(text)
    if len(wrong) < 3:
        raise ValueError(f"{attribute}/{category}: fewer than 3 distractors for {label!r}")
    options = rng.sample(wrong, 3) + [correct]
    rng.shuffle(options)
    position = options.index(correct)
    question = rng.choice(block["questions"])
    return format_options(question, options), f"{letter(position)} {correct}"


def single_question(attribute: str, labels: Sequence[str], label: str, rng: random.Random) -> tuple[str, str]:
    question = rng.choice(SINGLE_QUESTIONS[attribute])
    if attribute == "gender":
        options = ["Female", "Male"]
        correct = label.capitalize()
    else:
        options = rng.sample([x for x in labels if x != label], 3) + [label]
        rng.shuffle(options)
        correct = label
    return format_options(question, options), f"{letter(options.index(correct))} {correct}"


def sakura_plan(seed: int, knowledge: dict[str, Any]) -> tuple[list[Clip], dict[str, list[dict[str, Any]]]]:
    """Clips and metadata rows of the four SAKURA tracks."""
    clips: list[Clip] = []
    tables: dict[str, list[dict[str, Any]]] = {}
    for track, (attribute, labels) in TRACKS.items():
        rng = random.Random(f"{seed}:sakura:{track}")
        categories = list(knowledge[attribute]["categories"])
        rows = []
        running = 0
        for li, label in enumerate(labels):
            for i in range(CLIPS_PER_LABEL):
                gender = GENDERS[i % 2]
                if track == "Animal":
                    name = f"{label}{i + 1}.wav"
                    render = (lambda lab: lambda s, r: environmental_sound(lab, r))(label)
                elif track == "Emotion":
                    code = rng.choice(list(CREMA_SENTENCES))
                    name = f"{1030 + running}_{code}_{CREMA_EMOTION_CODES[label]}_{rng.choice(CREMA_LEVELS)}.wav"
                    render = (lambda lab, g, k, text: lambda s, r: emotional_speech(s, lab, g, k, text, r))(
                        label, gender, i // 2, CREMA_SENTENCES[code])
                elif track == "Gender":
                    text = ENGLISH_SENTENCES[(i + 3 * li) % len(ENGLISH_SENTENCES)]
                    name = f"en_test_{running}_common_voice_en_{22000000 + 1000 * running + rng.randrange(1000)}.wav"
                    render = (lambda g, k, t: lambda s, r: gendered_speech(s, g, k, t, r))(label, i // 2, text)
                else:
                    locale, _, sentences = LANGUAGE_SPEECH[label]
                    name = (f"{locale}_test_{i}_common_voice_{locale}_"
                            f"{30000000 + 1000 * running + rng.randrange(1000)}.wav")
                    render = (lambda g, k, t, lang: lambda s, r: gendered_speech(s, g, k, t, r, language=lang))(
                        gender, i // 2, sentences[i % len(sentences)], label)
                running += 1
                single_q, single_a = single_question(attribute, labels, label, rng)
                category = categories[(i + li) % len(categories)]
                multi_q, multi_a = multi_hop_question(knowledge, attribute, labels, label, category, rng)
                rows.append({"file": name, "attribute_label": label, "single_instruction": single_q,
                             "single_answer": single_a, "multi_instruction": multi_q, "multi_answer": multi_a})
                clips.append(Clip(f"sakura/{track}/audio/{name}", render, key=f"sakura/{track}/{name}"))
        tables[f"sakura/{track}/metadata.csv"] = rows
    return clips, tables


def add_noise(x: np.ndarray, rng: np.random.Generator, snr_db: float) -> np.ndarray:
    n = rng.standard_normal(len(x)) * 0.6 + noise(len(x), rng, 100, 2000)
    n *= np.sqrt(np.mean(x ** 2) / np.mean(n ** 2)) * 10 ** (-snr_db / 20)
    return x + n


def dsuperb_plan(seed: int) -> tuple[list[Clip], dict[str, list[dict[str, Any]]]]:
    """Clips and metadata of the Dynamic-SUPERB demo tasks (3 unrelated tasks, 2 about excluded attributes)."""
    clips: list[Clip] = []
    tables: dict[str, list[dict[str, Any]]] = {}

    def neutral(s: SpeechSynth, r: np.random.Generator, text: str, gender: str, k: int, speed: int | None = None,
                level: float | None = None, snr: float | None = None) -> np.ndarray:
        pitch = int(r.integers(20, 35)) if gender == "male" else int(r.integers(60, 80))
        x = s.render(text, voice_for("en-us", gender, k), pitch, speed or int(r.integers(150, 175)))
        x = finish_clip(x, 0.5, r)
        if snr is not None:
            x = add_noise(x, r, snr)
        return x * ((level or float(r.uniform(0.35, 0.6))) / np.max(np.abs(x)))

    specs: dict[str, list[tuple[str, Callable[..., np.ndarray]]]] = {
        "NoiseDetection": [], "SpeechRateClassification": [], "LoudnessClassification": [],
        "EmotionRecognition": [], "SpokenLanguageIdentification": []}
    for i in range(12):
        gender, text = GENDERS[i % 2], ENGLISH_SENTENCES[(i * 5) % len(ENGLISH_SENTENCES)]
        noisy = i % 4 in (0, 3)
        specs["NoiseDetection"].append(("yes" if noisy else "no", (lambda t, g, k, nz: lambda s, r: neutral(
            s, r, t, g, k, snr=float(r.uniform(0, 6)) if nz else None))(text, gender, i, noisy)))
        fast = i % 4 in (1, 2)
        specs["SpeechRateClassification"].append(("fast" if fast else "slow", (lambda t, g, k, f: lambda s, r: neutral(
            s, r, t, g, k, speed=int(r.integers(290, 330)) if f else int(r.integers(85, 100))))(
            ENGLISH_SENTENCES[(i * 7 + 1) % 12], gender, i, fast)))
        loud = i % 4 in (0, 2)
        specs["LoudnessClassification"].append(("loud" if loud else "quiet", (lambda t, g, k, ld: lambda s, r: neutral(
            s, r, t, g, k, level=float(r.uniform(0.85, 0.98)) if ld else float(r.uniform(0.03, 0.06))))(
            ENGLISH_SENTENCES[(i * 5 + 2) % 12], gender, i, loud)))
    for i, emotion in enumerate(["happy", "sad", "angry", "fear"]):
        code = list(CREMA_SENTENCES)[i]
        specs["EmotionRecognition"].append((emotion, (lambda e, g, t: lambda s, r: emotional_speech(s, e, g, 3, t, r))(
            emotion, GENDERS[i % 2], CREMA_SENTENCES[code])))
    for i, language in enumerate(["German", "French", "Japanese", "Korean"]):
        sentences = LANGUAGE_SPEECH[language][2]
        specs["SpokenLanguageIdentification"].append((language, (lambda g, t, lang: lambda s, r: gendered_speech(
            s, g, 2, t, r, language=lang))(GENDERS[(i + 1) % 2], sentences[(i + 5) % len(sentences)], language)))

    for task, items in specs.items():
        rng = random.Random(f"{seed}:dsuperb:{task}")
        rows = []
        for i, (label, render) in enumerate(items):
            name = f"{task}_{i:03d}.wav"
            rows.append({"file": name, "instruction": rng.choice(DSUPERB_INSTRUCTIONS[task]), "label": label})
            clips.append(Clip(f"dynamic_superb/{task}/{name}", render, key=f"dsuperb/{task}/{name}"))
        tables[f"dynamic_superb/{task}/{DSUPERB_TABLE}"] = rows
    return clips, tables


def pools_plan(seed: int) -> tuple[list[Clip], dict[str, list[dict[str, Any]]]]:
    """Extra audio pools in CREMA-D and ESC-50 layouts."""
    clips: list[Clip] = []
    rng = random.Random(f"{seed}:pools")
    actor = 1001
    for emotion in ["angry", "disgust", "fear", "happy", "neutral", "sad"]:
        for i in range(4):
            code = list(CREMA_SENTENCES)[(i + actor) % len(CREMA_SENTENCES)]
            level = "XX" if emotion == "neutral" else rng.choice(CREMA_LEVELS)
            name = f"{actor}_{code}_{CREMA_EMOTION_CODES[emotion]}_{level}.wav"
            render = (lambda e, g, t: lambda s, r: emotional_speech(s, e, g, 1, t, r))(
                emotion, GENDERS[i % 2], CREMA_SENTENCES[code])
            clips.append(Clip(f"pools/crema_d/AudioWAV/{name}", render, key=f"crema/{name}"))
            actor += 1
    rows = []
    counts = {**{a: 4 for a in ANIMALS}, "rain": 2, "sea_waves": 2}
    src = 100000
    for category, count in counts.items():
        for i in range(count):
            src += rng.randrange(1000, 9000)
            fold, take = i % 5 + 1, "ABC"[i % 3]
            target = ESC50_TARGETS[category]
            name = f"{fold}-{src}-{take}-{target}.wav"
            rows.append({"filename": name, "fold": fold, "target": target, "category": category,
                         "esc10": category in ESC10_CATEGORIES, "src_file": src, "take": take})
            clips.append(Clip(f"pools/esc50/audio/{name}", (lambda c: lambda s, r: environmental_sound(c, r))(category),
                              key=f"esc50/{name}"))
    return clips, {"pools/esc50/meta/esc50.csv": rows}


def dsuperb_parquet_bytes(rows: Sequence[dict[str, Any]], audio: dict[str, bytes]) -> bytes:
    """One Dynamic-SUPERB task table in the Phase-2 release layout: `file`, `audio` (a datasets `Audio` column
    holding the WAV bytes), `instruction`, `label`; deterministic (no statistics, fixed compression)."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = datasets.Features({"file": datasets.Value("string"), "audio": datasets.Audio(),
                                "instruction": datasets.Value("string"),
                                "label": datasets.Value("string")}).arrow_schema
    table = pa.Table.from_pylist([{"file": r["file"], "audio": {"bytes": audio[r["file"]], "path": r["file"]},
                                   "instruction": r["instruction"], "label": r["label"]} for r in rows], schema=schema)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="snappy", write_statistics=False, store_schema=True)
    return sink.getvalue().to_pybytes()


def mmlu_parquet_bytes() -> bytes:
    """The MMLU demo questions as Parquet in the cais/mmlu column layout."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for subject, question, choices, answer in MMLU_QUESTIONS:
        if len(choices) != 4 or not 0 <= answer < 4:
            raise ValueError(f"bad MMLU demo row: {question!r}")
    table = pa.table({
        "question": pa.array([q for _, q, _, _ in MMLU_QUESTIONS], pa.string()),
        "subject": pa.array([s for s, _, _, _ in MMLU_QUESTIONS], pa.string()),
        "choices": pa.array([c for _, _, c, _ in MMLU_QUESTIONS], pa.list_(pa.string())),
        "answer": pa.array([a for _, _, _, a in MMLU_QUESTIONS], pa.int64()),
    })
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="snappy", write_statistics=False, store_schema=True)
    return sink.getvalue().to_pybytes()


README_TEMPLATE = """# SAKE demo sources (synthetic)

Small stand-ins for the real SAKE sources, laid out exactly like the public releases so that the same readers
load both. They let the whole pipeline (dataset builder, editors, metric, leaderboard) run offline and in CI.

**All audio in this folder is synthetic.** It was made by `tools/make_demo_sources.py`: speech with espeak-ng
(shaped with sox: pitch shift, speed, tremolo, overdrive, filters), animal and ambient sounds with numpy. No
recording of any person or animal is included. Every clip is 16 kHz mono 16-bit PCM WAV, {min_s}-2.0 s long.
The questions and answers are written for this project; the multi-hop questions come from
`sake_dataset/portability_knowledge.yaml`.

| folder | layout of | content |
|---|---|---|
| `sakura/{{Animal,Emotion,Gender,Language}}/` | SAKURA | `metadata.csv` (`file,attribute_label,single_instruction,single_answer,multi_instruction,multi_answer`) + `audio/*.wav`; {per_label} clips per label |
| `dynamic_superb/<Task>/` | Dynamic-SUPERB Phase-2 | `data/test-00000-of-00001.parquet` (`file`, `audio` as a datasets `Audio` column with the WAV bytes, `instruction`, `label`), the release layout of each Phase-2 task; tasks: {tasks} (synthetic stand-ins, not Phase-2 tasks: their attributes are in `dynamic_superb_tasks.yaml`) |
| `mmlu/all/test-00000-of-00001.parquet` | cais/mmlu | {n_mmlu} simple questions (`question, subject, choices, answer`) over {n_subjects} subjects |
| `pools/crema_d/AudioWAV/` | CREMA-D | `{{actor}}_{{sentence}}_{{EMO}}_{{level}}.wav`, EMO in ANG DIS FEA HAP NEU SAD (NEU is not a SAKE label) |
| `pools/esc50/` | ESC-50 | `meta/esc50.csv` + `audio/`; SAKE animals plus rain and sea_waves (not SAKE labels) |

Acoustic design (so that a tiny audio encoder can learn the classes): emotions differ strongly in prosody
(happy: high pitch, fast; sad: low pitch, slow, quiet, low-passed; angry: loud, fast, overdriven; fear: high
pitch with tremolo; disgust: low pitch, slow, nasal and rough); male and female voices are separated in pitch
(espeak variants m1-m4 / f1-f4 plus a sox pitch shift); each language has its own speaking-rate band and a
channel signature (a +12 dB band and a faint -30 dB room tone at a language-specific frequency) on top of its
espeak-ng phonetics (Chinese through the `cmn-latn-pinyin` voice, Japanese written in kana); each animal has its
own synthetic call pattern (barks, meows, grunts, moos, croaks, clucks, crows, bleats, caws). The Emotion track
and the Language track mix male and female voices; the Gender and Emotion tracks are English.

File names imitate the originals (`dog1.wav`; CREMA-D `1030_IEO_HAP_XX.wav`; Common Voice
`de_test_0_common_voice_de_<id>.wav`; ESC-50 `1-107315-A-0.wav`); every id in them is made up.

Regenerate (deterministic: same seed and tool versions give byte-identical files):

```
python -m tools.make_demo_sources --out sake_dataset/demo_sources --seed {seed}
```

Generated with: {versions}.
"""


def readme_text(seed: int, tasks: Sequence[str]) -> str:
    import pyarrow

    versions = ", ".join([tool_version(["espeak-ng", "--version"]).split("  Data")[0],
                          tool_version(["sox", "--version"]).replace("sox:", "").strip(),
                          f"numpy {np.__version__}", f"pyarrow {pyarrow.__version__}"])
    return README_TEMPLATE.format(min_s=MIN_SECONDS, per_label=CLIPS_PER_LABEL, tasks=", ".join(tasks),
                                  n_mmlu=len(MMLU_QUESTIONS), n_subjects=len({s for s, *_ in MMLU_QUESTIONS}),
                                  seed=seed, versions=versions)


def build(out: Path, seed: int, text_only: bool = False) -> list[Path]:
    """Write every demo source under `out`; return the written paths."""
    from tqdm import tqdm

    knowledge = load_knowledge()
    clips, tables = sakura_plan(seed, knowledge)
    d_clips, d_tables = dsuperb_plan(seed)
    p_clips, p_tables = pools_plan(seed)
    clips += d_clips + p_clips
    tables.update(d_tables)
    tables.update(p_tables)

    written: list[Path] = []
    if not text_only:
        for sub in MANAGED_SUBDIRS:  # remove stale files of earlier runs
            if (out / sub).is_dir():
                shutil.rmtree(out / sub)
    dsuperb_tables = {rel: rows for rel, rows in tables.items() if rel.startswith("dynamic_superb/")}
    for rel, rows in tables.items():
        if rel in dsuperb_tables:
            continue  # Parquet with the audio inside: written once the audio is rendered
        columns = ESC50_COLUMNS if rel.endswith("esc50.csv") else SAKURA_COLUMNS
        atomic_write(out / rel, csv_bytes(columns, rows))
        written.append(out / rel)
    atomic_write(out / "mmlu/all/test-00000-of-00001.parquet", mmlu_parquet_bytes())
    written.append(out / "mmlu/all/test-00000-of-00001.parquet")
    table = TASK_TABLE_HEADER + yaml.safe_dump({"format": 1, "tasks": DSUPERB_TASK_ATTRIBUTES},
                                               default_flow_style=None, sort_keys=True)
    atomic_write(out / "dynamic_superb_tasks.yaml", table.encode("utf-8"))
    written.append(out / "dynamic_superb_tasks.yaml")
    if text_only:
        return written

    synth = SpeechSynth()
    embedded: dict[str, dict[str, bytes]] = {}  # Dynamic-SUPERB task folder -> {file: WAV bytes}
    try:
        for clip in tqdm(clips, desc="demo audio", unit="clip"):
            samples = clip.render(synth, clip_rng(seed, clip.key))
            if len(samples) > 2.0 * SAMPLE_RATE:
                raise RuntimeError(f"{clip.path}: {len(samples) / SAMPLE_RATE:.2f} s exceeds 2.0 s")
            if clip.path.startswith("dynamic_superb/"):
                folder, name = clip.path.rsplit("/", 1)
                embedded.setdefault(folder, {})[name] = wav_bytes(samples)
                continue
            atomic_write(out / clip.path, wav_bytes(samples))
            written.append(out / clip.path)
    finally:
        synth.close()
    for rel, rows in dsuperb_tables.items():
        folder = rel[: -len(DSUPERB_TABLE) - 1]
        atomic_write(out / rel, dsuperb_parquet_bytes(rows, embedded[folder]))
        written.append(out / rel)
    tasks = [rel.split("/")[1] for rel in d_tables]
    atomic_write(out / "README.md", readme_text(seed, tasks).encode("utf-8"))
    written.append(out / "README.md")
    return written


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder; its sakura/, dynamic_superb/, mmlu/ and pools/ subfolders are replaced "
                        "(default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    parser.add_argument("--text-only", action="store_true",
                        help="write only metadata CSVs and the MMLU Parquet (no espeak-ng/sox needed)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    written = build(args.out, args.seed, text_only=args.text_only)
    LOGGER.info("wrote %d files under %s", len(written), args.out)


if __name__ == "__main__":
    main()
