//! Chat formatting: a conversation rendered through the model's Jinja `chat_template` (as
//! `transformers`' `apply_chat_template` does, with `minijinja` and Python-compatible string
//! methods), and tokenized turn by turn with a mask marking the assistant tokens, the ones SFT
//! trains on. Every assistant turn ends with EOS, so that the model learns to stop.

use minijinja::{context, Environment};
use serde::{Deserialize, Serialize};

use crate::{Tokenizer, TokenizerError, DEFAULT_CHAT_TEMPLATE};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Self {
        Message {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// Token ids of a conversation and which of them are assistant tokens (trained on).
#[derive(Debug, Clone, PartialEq)]
pub struct ChatTokens {
    pub ids: Vec<u32>,
    pub assistant: Vec<bool>,
}

impl Tokenizer {
    fn template(&self) -> &str {
        self.chat_template
            .as_deref()
            .unwrap_or(DEFAULT_CHAT_TEMPLATE)
    }

    /// Renders `messages` with the chat template; with `add_generation_prompt`, the text ends
    /// where the assistant's answer begins.
    pub fn render_chat(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String, TokenizerError> {
        let mut env = Environment::new();
        // transformers compiles chat templates with trim_blocks and lstrip_blocks.
        env.set_syntax(
            minijinja::syntax::SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .build()
                .expect("syntax"),
        );
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_template("chat", self.template())
            .map_err(|e| TokenizerError::Other(format!("chat_template: {e}")))?;
        let tpl = env.get_template("chat").expect("added");
        tpl.render(context! {
            messages => messages.iter().map(|m| context! { role => m.role.clone(), content => m.content.clone() }).collect::<Vec<minijinja::Value>>(),
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.clone().unwrap_or_default(),
            eos_token => self.eos_token.clone().unwrap_or_default(),
            pad_token => self.pad_token.clone().unwrap_or_default(),
        })
        .map_err(|e| TokenizerError::Other(format!("chat_template: {e}")))
    }

    /// Token ids of the prompt a model answers: the conversation plus the generation prompt.
    pub fn encode_chat_prompt(&self, messages: &[Message]) -> Result<Vec<u32>, TokenizerError> {
        self.encode(&self.render_chat(messages, true)?)
    }

    /// Tokenizes a conversation segment by segment: the text each assistant message adds to the
    /// rendering is an assistant segment (ending in EOS, appended when the template does not put
    /// it there); everything else is context. Segments are tokenized separately, exactly as a
    /// prompt is tokenized before the model answers it at inference.
    pub fn encode_chat(&self, messages: &[Message]) -> Result<ChatTokens, TokenizerError> {
        let mut ids = Vec::new();
        let mut assistant = Vec::new();
        let mut done = String::new();
        let eos = self.eos_id();
        for i in 0..messages.len() {
            if messages[i].role != "assistant" {
                continue;
            }
            let before = self.render_chat(&messages[..i], true)?;
            let after = self.render_chat(&messages[..=i], false)?;
            let context = before.strip_prefix(done.as_str()).ok_or_else(|| {
                TokenizerError::Other("chat_template renders a prefix of a conversation differently from the whole; cannot mask per turn".into())
            })?;
            let answer = after.strip_prefix(before.as_str()).ok_or_else(|| {
                TokenizerError::Other("chat_template: the rendering with an assistant turn does not extend the generation prompt".into())
            })?;
            let c = self.encode(context)?;
            assistant.extend(std::iter::repeat_n(false, c.len()));
            ids.extend(c);
            let mut a = self.encode(answer)?;
            if let Some(e) = eos {
                if !a.contains(&e) {
                    a.push(e);
                }
            }
            assistant.extend(std::iter::repeat_n(true, a.len()));
            ids.extend(a);
            done = after;
        }
        let full = self.render_chat(messages, false)?;
        if let Some(rest) = full.strip_prefix(done.as_str()) {
            let r = self.encode(rest)?;
            assistant.extend(std::iter::repeat_n(false, r.len()));
            ids.extend(r);
        }
        Ok(ChatTokens { ids, assistant })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokenizer() -> Tokenizer {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.txt");
        std::fs::write(
            &p,
            "What color does Mira like? Mira likes blue. Sure! ".repeat(40),
        )
        .unwrap();
        Tokenizer::train(&[p], 320).unwrap()
    }

    #[test]
    fn default_template_renders_and_masks_assistant_tokens() {
        let tk = tokenizer();
        let msgs = vec![
            Message::new("user", "What color does Mira like?"),
            Message::new("assistant", "Mira likes blue."),
        ];
        let text = tk.render_chat(&msgs, false).unwrap();
        assert_eq!(text, "<|bos|><|user|>\nWhat color does Mira like?<|eos|>\n<|assistant|>\nMira likes blue.<|eos|>\n");
        let prompt = tk.render_chat(&msgs[..1], true).unwrap();
        assert_eq!(
            prompt,
            "<|bos|><|user|>\nWhat color does Mira like?<|eos|>\n<|assistant|>\n"
        );
        let ct = tk.encode_chat(&msgs).unwrap();
        let trained: Vec<u32> = ct
            .ids
            .iter()
            .zip(&ct.assistant)
            .filter(|(_, &a)| a)
            .map(|(&i, _)| i)
            .collect();
        // Exactly the answer, its EOS and the newline after it.
        assert_eq!(
            tk.decode(&trained, false).unwrap(),
            "Mira likes blue.<|eos|>\n"
        );
        assert_eq!(
            ct.ids[..tk.encode_chat_prompt(&msgs[..1]).unwrap().len()],
            tk.encode_chat_prompt(&msgs[..1]).unwrap()[..]
        );
    }

    #[test]
    fn eos_is_appended_when_the_template_has_none() {
        let mut tk = tokenizer();
        tk.chat_template = Some("{% for m in messages %}{{ m.role }}: {{ m.content | trim }}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}".into());
        let msgs = vec![
            Message::new("user", "hi"),
            Message::new("assistant", "hello "),
            Message::new("user", "bye"),
            Message::new("assistant", "ok"),
        ];
        let ct = tk.encode_chat(&msgs).unwrap();
        let eos = tk.eos_id().unwrap();
        let n_eos = ct
            .ids
            .iter()
            .zip(&ct.assistant)
            .filter(|(&i, &a)| a && i == eos)
            .count();
        assert_eq!(n_eos, 2, "each assistant turn ends with EOS");
    }

    #[test]
    fn python_string_methods_work_in_templates() {
        let mut tk = tokenizer();
        tk.chat_template =
            Some("{% for m in messages %}{{ m['content'].strip().upper() }}|{% endfor %}".into());
        assert_eq!(
            tk.render_chat(&[Message::new("user", "  hi  ")], false)
                .unwrap(),
            "HI|"
        );
    }
}
