"""The chat's own script, run once when the page opens (``demo.load(None, js=CHAT_SCRIPT)``).

What Gradio's Chatbot does not do itself:
- ‹ › under a reply (``message_display.reply_line``) write "index:step:nonce" into the hidden
  ``#version-request`` box and click the hidden ``#version-go``, which the server answers;
- the edit box of a message is as wide as the chat, shows the message's own text (without the
  marked lines the display adds) and saves on Enter (Shift+Enter: a new line);
- the copy buttons copy a message's own text, without those lines; Regenerate while an edit box
  is open saves the edit (which answers the edited text) instead of answering the old one;
- the notice above the message box (``#chat-status``) closes with its ×, and opens again with
  the next notice.
"""

CHAT_SCRIPT = r"""() => {
    if (window.loadstarChat) return;
    window.loadstarChat = true;
    const strip = (text) => String(text)
        .replace(/^<div class="speaker">[\s\S]*?<\/div><!--\/speaker-->\n\n/, '')
        .replace(/\n\n<div class="reply-meta[^"]*">[\s\S]*?<\/div><!--\/meta-->/g, '')
        .replace(/<div class="speaker">[\s\S]*?<\/div><!--\/speaker-->\n\n/g, '');
    if (navigator.clipboard && navigator.clipboard.writeText) {
        const write = navigator.clipboard.writeText.bind(navigator.clipboard);
        navigator.clipboard.writeText = (text) => write(strip(text));
    }
    document.addEventListener('click', (event) => {
        const button = event.target.closest && event.target.closest('#chatbot .reply-meta button');
        if (button) {
            event.preventDefault();
            event.stopPropagation();
            if (button.classList.contains('ls-off')) return;
            const meta = button.closest('.reply-meta');
            const at = [...meta.classList].find((c) => c.startsWith('ls-at-'));
            const box = document.querySelector('#version-request textarea, #version-request input');
            if (!at || !box) return;
            const step = button.classList.contains('ls-prev') ? -1 : 1;
            box.value = `${at.slice(6)}:${step}:${Date.now()}`;
            box.dispatchEvent(new Event('input', {bubbles: true}));
            setTimeout(() => { const go = document.querySelector('#version-go'); if (go) go.click(); }, 0);
            return;
        }
        const again = event.target.closest && event.target.closest('#regenerate');
        const save = document.querySelector('#chatbot button[aria-label="Submit"]');
        if (again && save && document.querySelector('#chatbot textarea.edit-textarea')) {
            event.preventDefault();  // Regenerate with an edit box open answers the edited text: save it
            event.stopPropagation();
            save.click();
            return;
        }
        const notice = event.target.closest && event.target.closest('#chat-status');
        if (notice && event.clientX > notice.getBoundingClientRect().right - 36) notice.classList.add('ls-dismissed');
    }, true);
    const status = () => document.querySelector('#chat-status');
    const watch = (tries) => {
        const element = status();
        if (!element) { if (tries > 0) setTimeout(() => watch(tries - 1), 100); return; }
        new MutationObserver(() => element.classList.remove('ls-dismissed'))
            .observe(element, {childList: true, subtree: true, characterData: true});
    };
    watch(100);
    const editing = (target) => target && target.matches && target.matches('#chatbot textarea.edit-textarea');
    document.addEventListener('focusin', (event) => {
        const box = event.target;
        if (!editing(box)) return;
        const own = strip(box.value);
        if (own !== box.value) {
            box.value = own;
            box.dispatchEvent(new Event('input', {bubbles: true}));
        }
        box.style.height = 'auto';
        box.style.height = Math.min(box.scrollHeight + 4, window.innerHeight * 0.5) + 'px';
    }, true);
    document.addEventListener('keydown', (event) => {
        if (!editing(event.target) || event.key !== 'Enter' || event.shiftKey || event.isComposing) return;
        event.preventDefault();
        const save = document.querySelector('#chatbot button[aria-label="Submit"]');
        if (save) save.click();
    }, true);
}"""
