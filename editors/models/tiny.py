"""Offline helpers of the tiny random-init models (tests, CI; no Hub access): a byte-level BPE tokenizer trained
on SAKE-style text, a small Whisper feature extractor, and the Whisper frame arithmetic the adapters share."""

from __future__ import annotations

from typing import Any, Sequence

from sake_core.protocol import SAMPLING_RATE

#: Text the tiny tokenizers' byte-level BPE is trained on: attribute labels and SAKE-style question words, so
#: demo questions and answers take few tokens. Byte-level BPE still encodes any text.
TINY_CORPUS: tuple[str, ...] = (
    "What is the emotion of the speaker? (a) happy (b) sad (c) angry (d) neutral (e) surprised (f) disgusted "
    "(g) fearful",
    "Which animal makes this sound? (a) dog (b) cat (c) cow (d) pig (e) frog (f) hen (g) rooster (h) sheep "
    "(i) crow (j) bird (k) horse (l) insects",
    "What is the gender of the speaker? (a) male (b) female. Is the speaker a man or a woman?",
    "Which language is spoken in the audio? (a) English (b) German (c) Spanish (d) French (e) Italian "
    "(f) Chinese (g) Japanese (h) Korean",
    "Answer the question about the audio. The answer is the option text. Please choose one option.",
    "You are a helpful assistant. Imagine that the speaker's emotion in this audio is perceived as",
    "New fact: the sound of the audio is now recognised as. Reply with the answer only.",
    "Question: which of the following is correct? Answer: A B C D. Choose the best answer.",
    "the of and to in is that for it as with was on be by this are from at an or which",
    "speaker voice sounds audio clip recording language animal gender emotion label sound speech",
    "system user assistant. Apply the following knowledge updates when answering questions about audio.",
    "New fact: a speaker emotion that you used to perceive as must now be perceived as. Whenever you would "
    "answer for such audio, answer instead. an animal sound, a speaker gender, a spoken language",
    "How does the speaker in this recording feel? Identify the emotional state of the person speaking in this "
    "clip. Based on the voice, what is the speaker's gender? Is there background noise in this recording? "
    "Answer yes or no.",
)


def build_tiny_tokenizer(special_tokens: Sequence[str], *, eos_token: str, pad_token: str, chat_template: str,
                         vocab_size: int = 640) -> Any:
    """A byte-level BPE tokenizer trained offline on :data:`TINY_CORPUS`, wrapped as a fast tokenizer with the
    given special tokens and chat template (deterministic: the same arguments give the same vocabulary)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(list(TINY_CORPUS) * 4, trainer=trainer)
    others = [t for t in special_tokens if t not in (eos_token, pad_token)]
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token=eos_token, pad_token=pad_token,
                                  additional_special_tokens=others, padding_side="left")
    tok.chat_template = chat_template
    return tok


def tiny_feature_extractor(num_mel_bins: int = 16, chunk_length: int = 2) -> Any:
    """A WhisperFeatureExtractor with few mel bins and a short chunk (clips of <= ``chunk_length`` s are not padded
    to 30 s). The encoder's ``max_source_positions`` must be ``chunk_length * 100 // 2``."""
    from transformers import WhisperFeatureExtractor

    return WhisperFeatureExtractor(feature_size=num_mel_bins, sampling_rate=SAMPLING_RATE, hop_length=160,
                                   chunk_length=chunk_length, n_fft=400, return_attention_mask=True)


def whisper_mel_frames(num_samples: int, feature_extractor: Any) -> int:
    """Valid mel frames of a clip after the Whisper feature extractor pads/truncates it to its chunk length."""
    n = min(int(num_samples), int(feature_extractor.n_samples))
    return max(1, -(-n // int(feature_extractor.hop_length)))


def whisper_encoder_tokens(mel_frames: int) -> int:
    """Encoder outputs after the stride-2 conv and the stride-2 average pool (Qwen2-Audio / AF3 encoders)."""
    conv = (mel_frames - 1) // 2 + 1
    return (conv - 2) // 2 + 1


def tiny_whisper(seed: int = 0, *, release_rules: bool = False, eos_scale: float = 1.0, device: str = "cpu") -> Any:
    """A random-init Whisper small enough for a unit test (vocabulary 64, 2 decoder layers of width 32, 24 encoder
    frames), end token 0, start token 1, weights wide enough (init std 0.3) that transcripts differ by input.
    ``eos_scale`` scales the end token's embedding (tied to the output head), so that a larger scale ends more
    transcripts early. ``release_rules``: a generation config shaped like the multilingual releases' (language
    tokens 2-4 detected per audio, ``transcribe`` 5 forced at position 2, ``<|notimestamps|>`` 61, suppressed
    tokens at every step and at the first, the timestamp tokens 62-63 among them)."""
    import torch
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    config = WhisperConfig(vocab_size=64, num_mel_bins=8, d_model=32, encoder_layers=1, encoder_attention_heads=4,
                           decoder_layers=2, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                           max_source_positions=24, max_target_positions=40, decoder_start_token_id=1,
                           bos_token_id=0, eos_token_id=0, pad_token_id=0, begin_suppress_tokens=None,
                           suppress_tokens=None, init_std=0.3)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    whisper = WhisperForConditionalGeneration(config).eval()
    with torch.no_grad():  # the end token's row (the padding row, zero at init) as wide as the others
        whisper.model.decoder.embed_tokens.weight[0] = torch.randn(32, generator=generator) * 0.3 * eos_scale
    if release_rules:
        gen = whisper.generation_config
        gen.lang_to_id = {"<|en|>": 2, "<|de|>": 3, "<|fr|>": 4}
        gen.task_to_id = {"transcribe": 5, "translate": 6}
        gen.no_timestamps_token_id = 61
        gen.forced_decoder_ids = [[1, None], [2, 5]]
        gen.suppress_tokens = [8, 9, 10, 62, 63]
        gen.begin_suppress_tokens = [0, 11]
        gen.is_multilingual = True
    return whisper.to(device)
