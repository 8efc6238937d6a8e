// ESLint (flat config) for the browser playground's JavaScript; `make lint` runs it.
import js from "@eslint/js";
import globals from "globals";

export default [
  {
    ignores: ["node_modules/**", ".venv/**", ".cache/**", "tmp/**"],
  },
  js.configs.recommended,
  {
    files: ["services/api/playground/**/*.js"],
    languageOptions: {
      ecmaVersion: 2022,
      sourceType: "module",
      globals: { ...globals.browser },
    },
    rules: {
      eqeqeq: "error",
      "no-eval": "error",
      "no-implied-eval": "error",
      "no-new-func": "error",
      "no-var": "error",
      "prefer-const": "error",
      "no-restricted-properties": [
        "error",
        { property: "innerHTML", message: "Render text with textContent." },
        { property: "outerHTML", message: "Render text with textContent." },
        { property: "insertAdjacentHTML", message: "Render text with textContent." },
      ],
      "no-restricted-syntax": [
        "error",
        { selector: "CallExpression[callee.property.name='write']", message: "No document.write." },
      ],
    },
  },
  {
    files: ["eslint.config.js"],
    languageOptions: { sourceType: "module", globals: { ...globals.node } },
  },
];
