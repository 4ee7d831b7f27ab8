// Render an Ollama Modelfile TEMPLATE with Go's text/template, as Ollama does: .Messages of {Role, Content}.
//
//	go run tests/go/render_template.go TEMPLATE_FILE < messages.json
package main

import (
	"encoding/json"
	"os"
	"text/template"
)

type Message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

func main() {
	source, err := os.ReadFile(os.Args[1])
	if err != nil {
		panic(err)
	}
	var messages []Message
	if err := json.NewDecoder(os.Stdin).Decode(&messages); err != nil {
		panic(err)
	}
	tmpl := template.Must(template.New("modelfile").Parse(string(source)))
	if err := tmpl.Execute(os.Stdout, map[string]any{"Messages": messages}); err != nil {
		panic(err)
	}
}
