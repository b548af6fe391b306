"""A small sample of general English, written for this project, that the offline BPE tokenizer
is trained on together with the tasks' text.

Why it exists: a tokenizer trained on the tasks alone would learn merges for digits and
``rev:``/``sort:`` only, and every word of a system prompt, a chat role or a free-form prompt
would fall apart into single bytes. A few kilobytes of ordinary sentences give it word-level
merges for common English, which is what makes it behave like a real model's tokenizer (words,
word pieces with a leading space, punctuation) while it stays trainable in a second offline.
The text is original (no download, no licence question) and kept in a module rather than a data
file so that it ships with any install of the package.
"""

GENERAL_TEXT = """\
The quick brown fox jumps over the lazy dog, and the dog does not seem to mind.
A good answer is short, correct and easy to check.
Please rewrite the sentence so that it uses the past tense.
Fix the spelling and grammar in the following paragraph, and change nothing else.
The teacher reads the student's answer and marks only the words that are wrong.
When the answer is already right, the teacher leaves it exactly as it is.
You are a helpful assistant. Answer the question as briefly as you can.
The user asks a question, and the assistant replies with one clear answer.
It rained all morning, so we stayed inside and read our books by the window.
In the afternoon the sun came out and the children went to play in the park.
She opened the letter slowly, afraid of what it might say.
He said that he would call back later, but he never did.
The train to the city leaves at half past seven every weekday morning.
Water boils at one hundred degrees Celsius at sea level.
The moon moves around the earth, and the earth moves around the sun.
Most birds can fly, but penguins and ostriches cannot.
A triangle has three sides, a square has four, and a pentagon has five.
To make tea, boil the water, pour it over the leaves and wait a few minutes.
The library is open from nine in the morning until six in the evening.
Our team finished the project on time, although the last week was very busy.
Could you tell me where the nearest station is?
I think the second option is better because it is simpler and cheaper.
The report should be written in plain language that anyone can understand.
Small changes are easier to review than large ones.
Read the instructions carefully before you start the exercise.
Every morning the baker wakes up early to bake fresh bread for the village.
The museum has a large collection of old maps, coins and paintings.
They walked along the river until they reached the old stone bridge.
The meeting was moved from Tuesday to Thursday because several people were away.
If you are not sure about an answer, say so instead of guessing.
The weather will be cold and windy tomorrow, with some snow in the hills.
My grandmother grew tomatoes, beans and potatoes in her small garden.
The new road will make the journey between the two towns much shorter.
Numbers can be added, subtracted, multiplied and divided.
Sort the list from the smallest number to the largest one.
Write the word backwards, one letter at a time, starting from the end.
The cat sat on the warm windowsill and watched the birds outside.
We need to buy milk, eggs, flour and sugar before the shops close.
The computer program reads the input, checks it and prints the result.
A language model predicts the next word from the words that came before it.
Training a model takes data, time and a careful choice of settings.
The correction shows what should have been written instead of the mistake.
An edit that changes one word is smaller than an edit that changes the whole sentence.
The students were asked to summarise the article in three sentences.
There are seven days in a week and twelve months in a year.
The doctor told him to rest for a few days and drink plenty of water.
On clear nights you can see thousands of stars from the top of the mountain.
The shop on the corner sells newspapers, sweets and stamps.
Her favourite season is autumn, when the leaves turn red and gold.
He forgot his umbrella at home and got wet on the way to work.
The results of the experiment were surprising, so the scientists repeated it.
Good writing is clear, honest and to the point.
This sentence contains a mistake that the teacher should find and fix.
Thank you for your help; I could not have done it without you.
What is the capital of France? The capital of France is Paris.
How many legs does a spider have? A spider has eight legs.
Which is heavier, a kilogram of feathers or a kilogram of stones? They weigh the same.
The first step is to understand the problem; the second is to solve it.
"Where are you going?" she asked. "To the market," he answered.
Prices rose by three percent last year, while wages rose by two percent.
The bridge was built in the nineteenth century and is still in use today.
Please keep your answer under fifty words.
The system prompt tells the assistant how to behave during the conversation.
"""
