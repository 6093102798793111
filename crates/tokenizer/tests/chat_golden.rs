//! Chat templates render exactly as `transformers`' `apply_chat_template` renders them
//! (fixture written by tools/golden/make_chat_fixture.py).

use kiln_tokenizer::chat::Message;
use kiln_tokenizer::Tokenizer;

#[test]
fn templates_render_like_transformers() {
    let text = include_str!("fixtures/chat_templates.json");
    let fixture: serde_json::Value = serde_json::from_str(text).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("c.txt");
    std::fs::write(&p, "hello world ".repeat(20)).unwrap();
    let mut tk = Tokenizer::train(&[p], 300).unwrap();
    assert_eq!(fixture["bos_token"], tk.bos_token.clone().unwrap());
    let cases = fixture["cases"].as_array().unwrap();
    assert!(cases.len() >= 16);
    for case in cases {
        tk.chat_template = Some(case["template"].as_str().unwrap().to_string());
        let messages: Vec<Message> = serde_json::from_value(case["messages"].clone()).unwrap();
        let got = tk
            .render_chat(&messages, case["add_generation_prompt"].as_bool().unwrap())
            .unwrap();
        assert_eq!(
            got,
            case["expected"].as_str().unwrap(),
            "template {}",
            case["name"]
        );
    }
}
